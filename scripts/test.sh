#!/usr/bin/env bash
# The project's test command (README.md): the whole suite, parallel-safe, on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q "$@"
