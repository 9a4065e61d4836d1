#!/usr/bin/env python3
"""Build a tiny, randomly initialised Llama model directory offline, to try real engines on.

Usage (the second line serves it behind the OpenAI API)::

    python scripts/make_tiny_model.py /tmp/tiny
    dynamo-backend run --engine examples/transformers_engine.py:TransformersEngine --model /tmp/tiny

Writes ``DEST`` (created if missing; files of the same names are overwritten): ``config.json``,
``generation_config.json``, ``model.safetensors`` and the packaged tiny tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with its chat template); see
:func:`dynamo_backend_common.fixtures.make_tiny_llama`, which the tests use too. Nothing is
downloaded. The model streams random tokens: it is for plumbing, not for answers. Prints
``DEST`` and exits 0; exits 1 with one line when torch or transformers is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynamo_backend_common.fixtures import make_tiny_llama


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("dest", type=Path, help="the model directory to write")
    parser.add_argument("--seed", type=int, default=0,
                        help="weights' random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_llama(args.dest, seed=args.seed)
    except ImportError as exc:
        print(f"make_tiny_model.py: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
