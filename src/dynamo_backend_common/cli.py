"""``dynamo-backend`` command line.

Subcommands:
- ``worker --engine SPEC [worker flags] [-- engine flags]``: serve one engine as a worker.
- ``conformance --engine SPEC [-- engine flags]``: run the conformance kit against an engine.

``SPEC`` is ``echo``, ``mocker``, ``package.module:Class`` or ``path/to/file.py:Class``. Flags
the worker does not know are passed to the engine's ``from_args(argv)`` classmethod when it has
one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence

from .engine import LLMEngine

ENGINE_ALIASES = {
    "echo": "dynamo_backend_common.echo:EchoEngine",
    "mocker": "dynamo_backend_common.mocker:MockerEngine",
}


def load_engine_class(spec: str) -> type[LLMEngine]:
    """Resolve an engine spec to its class; raises ``SystemExit`` with a clear message."""
    target = ENGINE_ALIASES.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--engine must be echo, mocker, module:Class or file.py:Class; "
                         f"got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            mod_spec = importlib.util.spec_from_file_location(
                os.path.splitext(os.path.basename(path))[0], path
            )
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise SystemExit(f"cannot import engine module {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, LLMEngine)):
        raise SystemExit(f"{target!r} is not an LLMEngine subclass")
    return cls


def engine_factory(cls: type[LLMEngine], argv: Sequence[str]) -> Callable[[], LLMEngine]:
    """A zero-argument factory building ``cls`` from ``argv`` (via ``from_args`` if present)."""
    from_args = getattr(cls, "from_args", None)
    if from_args is None and argv:
        raise SystemExit(f"{cls.__name__} takes no arguments (it has no from_args); "
                         f"got {' '.join(argv)}")

    def make() -> LLMEngine:
        if from_args is not None:
            engine = from_args(list(argv))
            if isinstance(engine, tuple):  # (engine, extra) factories are accepted
                engine = engine[0]
            return engine  # type: ignore[no-any-return]
        return cls()

    return make


def _split_engine_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _cmd_worker(args: argparse.Namespace, rest: list[str]) -> int:
    from .config import WorkerConfig
    from .worker import run

    cls = load_engine_class(args.engine)
    factory = engine_factory(cls, rest)
    config = WorkerConfig.from_args(args)
    return run(factory, config)


def _cmd_conformance(args: argparse.Namespace, rest: list[str]) -> int:
    from .log_setup import configure_logging
    from .testing import run_conformance

    configure_logging("warning")
    cls = load_engine_class(args.engine)
    factory = engine_factory(cls, rest)
    report = asyncio.run(run_conformance(factory))
    print(report)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from .config import add_worker_args

    parser = argparse.ArgumentParser(
        prog="dynamo-backend",
        description="Serve LLM engines: workers, conformance checks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    w = sub.add_parser(
        "worker",
        help="serve one engine as a worker",
        description="Serve one engine as a worker. Unknown flags (or everything after --) go to "
        "the engine's from_args().",
    )
    w.add_argument("--engine", required=True,
                   help="echo | mocker | package.module:Class | path/file.py:Class")
    add_worker_args(w)
    w.set_defaults(func=_cmd_worker)
    c = sub.add_parser(
        "conformance",
        help="check an engine against the LLMEngine contract",
        description="Run the conformance kit against an engine and print the report; exit 1 "
        "on any failure.",
    )
    c.add_argument("--engine", required=True,
                   help="echo | mocker | package.module:Class | path/file.py:Class")
    c.set_defaults(func=_cmd_conformance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    mine, engine_argv = _split_engine_args(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(mine)
    if args.command is None:
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    return func(args, unknown + engine_argv)


if __name__ == "__main__":
    sys.exit(main())
