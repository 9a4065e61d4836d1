"""``dynamo-backend`` command line.

Subcommands:
- ``worker --engine SPEC [worker flags] [-- engine flags]``: serve one engine as a worker.
- ``conformance --engine SPEC [-- engine flags]``: run the conformance kit against an engine.
- ``frontend [--host] [--port] [--discovery URL] [--events URL] [--router-mode MODE] ...``: the
  OpenAI-compatible HTTP frontend for workers found through discovery (multi-machine setups);
  ``--processes N`` runs N of them on one port.
- ``run --engine SPEC [--model DIR] [--workers N] [--port P] [-- engine flags]``: the
  one-command server: N worker subprocesses plus the frontend, on one machine.
- ``bench [--url URL] [--model NAME] [--concurrency 1,64] [--requests N]``: load-test a running
  OpenAI-compatible server (requests/s, tokens/s, TTFT and ITL p50/p99).

``SPEC`` is ``echo``, ``mocker``, ``package.module:Class`` or ``path/to/file.py:Class`` (the
file's folder is put on ``sys.path`` first, as ``python file.py`` would, so an engine split over
several files next to each other imports). Engine flags go after ``--`` and are passed to the
engine's ``from_args(argv)`` classmethod; a flag before ``--`` that the command does not know
(a typo such as ``--served-model-nam``, an abbreviation) is an error, never an engine flag.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..engine import LLMEngine
from ..runtime.loop import run_coroutine
from ..runtime.planes import add_plane_args

ENGINE_ALIASES = {
    "echo": "dynamo_backend_common.engines.echo:EchoEngine",
    "mocker": "dynamo_backend_common.engines.mocker:MockerEngine",
}


def load_engine_class(spec: str) -> type[LLMEngine]:
    """Resolve an engine spec to its class; raises ``SystemExit`` with a clear message.

    ``file.py:Class`` loads the file as module ``file`` with the file's folder on ``sys.path``
    (front, unless already there), so ``from helper import x`` finds ``helper.py`` beside it.
    A missing ``Class`` says "not found" and lists the ``LLMEngine`` subclasses the module
    defines; a name that is not an ``LLMEngine`` subclass says so.
    """
    target = ENGINE_ALIASES.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"--engine must be echo, mocker, module:Class or file.py:Class; "
                         f"got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            folder = os.path.dirname(path)
            if folder not in sys.path:
                sys.path.insert(0, folder)
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
    if cls is None:
        found = sorted(n for n, v in vars(module).items()
                       if inspect.isclass(v) and issubclass(v, LLMEngine) and v is not LLMEngine
                       and v.__module__ == module.__name__)
        raise SystemExit(f"class {attr!r} not found in {module_name!r}; LLMEngine subclasses "
                         f"defined there: {', '.join(found) or 'none'}")
    if not (inspect.isclass(cls) and issubclass(cls, LLMEngine)):
        what = f"class {cls.__name__}" if inspect.isclass(cls) else type(cls).__name__
        raise SystemExit(f"{target!r} is a {what}, not an LLMEngine subclass")
    from ..worker.lifecycle import check_engine_methods

    try:
        check_engine_methods(cls)
    except TypeError as exc:
        raise SystemExit(str(exc)) from None
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
    from ..worker import run
    from ..worker.config import WorkerConfig

    cls = load_engine_class(args.engine)
    factory = engine_factory(cls, rest)
    try:
        config = WorkerConfig.from_args(args)
    except ValueError as exc:  # a bad flag value: one line, not a traceback
        raise SystemExit(f"dynamo-backend worker: {exc}") from None
    return run(factory, config)  # exports --model-path as $DYN_MODEL_PATH for the engine


def _cmd_conformance(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the kit; progress goes to stderr as it happens, the report to stdout at the end.

    Each check's name is printed (flushed) when it starts and completed with ``ok``/``FAIL``/
    ``skip`` and its time when it ends, so a hanging engine shows the check it hangs in at once.
    """
    from ..log_setup import configure_logging
    from ..testing import CheckProgress, run_conformance

    for flag, value in (("--timeout", args.timeout), ("--start-timeout", args.start_timeout)):
        if value is not None and not value > 0:
            args.command_parser.error(f"{flag} must be a positive number of seconds")

    started: set[str] = set()

    def show(event: CheckProgress) -> None:
        label = f"  {event.check} ".ljust(26, ".") + " "
        if event.status == "running":
            started.add(event.check)
            print(label, end="", file=sys.stderr, flush=True)
            return
        kinds = ", ".join(dict.fromkeys(f.kind for f in event.failures))
        line = "" if event.check in started else label  # a skipped check never started
        if event.status == "skip":
            line += f"skip: {event.reason}"
        else:
            line += f"{event.status} {event.seconds:.2f}s" + (f" ({kinds})" if kinds else "")
        print(line, file=sys.stderr, flush=True)

    configure_logging("warning")
    cls = load_engine_class(args.engine)
    factory = engine_factory(cls, rest)
    report = asyncio.run(run_conformance(factory, timeout=args.timeout,
                                         start_timeout=args.start_timeout, progress=show))
    print(report)
    return 0 if report.ok else 1


def _router_args(p: argparse.ArgumentParser) -> None:
    from ..frontend.routing import HEADER_WORKER_INSTANCE_ID, normalize_router_mode

    def router_mode(value: str) -> str:
        try:
            return normalize_router_mode(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def seconds(value: str) -> float:
        ttl = float(value)
        if not ttl > 0:
            raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
        return ttl

    env = os.environ.get
    p.add_argument("--router-mode", type=router_mode, metavar="MODE",
                   default=env("DYN_ROUTER_MODE", "round_robin"),
                   help="how requests pick a worker: round_robin (in turn), random, "
                        "power_of_two (of two random workers, the one with fewer requests in "
                        "flight), least_loaded (the fewest requests in flight), kv (KV-cache "
                        "aware), direct (the worker the request names in the "
                        f"{HEADER_WORKER_INSTANCE_ID} header); Dynamo's spellings round-robin, "
                        "power-of-two, least-loaded are accepted too [DYN_ROUTER_MODE] "
                        "(default: %(default)s)")
    p.add_argument("--kv-events", "--router-kv-events", dest="kv_events",
                   action=argparse.BooleanOptionalAction,
                   default=env("DYN_ROUTER_USE_KV_EVENTS", env("DYN_KV_EVENTS", "1")).strip()
                   .lower() not in ("0", "false", "no", "off"),
                   help="kv mode: index the workers' KV events; --no-kv-events predicts each "
                        "worker's cache from the routing decisions instead, no event plane "
                        "needed [DYN_ROUTER_USE_KV_EVENTS] (default: on)")
    p.add_argument("--router-ttl", "--router-ttl-secs", dest="router_ttl_secs", type=seconds,
                   default=env("DYN_ROUTER_TTL", "120"), metavar="SECONDS",
                   help="kv mode with --no-kv-events: how long a routed prompt's blocks count "
                        "as cached on its worker [DYN_ROUTER_TTL] (default: %(default)s)")
    p.add_argument("--kv-overlap-weight", type=float, default=1.0,
                   help="kv mode: weight of prefix-cache overlap against load "
                        "(default: %(default)s)")
    p.add_argument("--router-temperature", type=float, default=0.0,
                   help="kv mode: softmax temperature over worker costs, 0 = always the best "
                        "(default: %(default)s)")
    p.add_argument("--router-replica-sync", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="routers of several frontend processes (or frontends on one event "
                        "plane) share their requests in flight, so they do not all pick the "
                        "same idle worker (kv, power_of_two, least_loaded) (default: on with "
                        "more than one frontend process)")
    p.add_argument("--enforce-disagg", action="store_true",
                   default=env("DYN_ENFORCE_DISAGG", "").strip().lower()
                   in ("1", "true", "yes", "on"),
                   help="models with decode workers: fail a request (503) when no prefill "
                        "worker can take it, instead of serving it aggregated on a decode "
                        "worker [DYN_ENFORCE_DISAGG]")
    p.add_argument("--api-key", default=os.environ.get("DYN_API_KEY") or None,
                   help="require Authorization: Bearer KEY on /v1/* [DYN_API_KEY]")
    _openai_args(p)


def _processes(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def _openai_args(p: argparse.ArgumentParser) -> None:
    from ..frontend.reasoning import REASONING_PARSERS
    from ..frontend.tool_calls import TOOL_CALL_PARSERS

    env = os.environ.get
    p.add_argument("--tool-call-parser", default=env("DYN_TOOL_CALL_PARSER", "auto"),
                   choices=["auto", "none", *sorted(TOOL_CALL_PARSERS)], metavar="NAME",
                   help="how tool calls are read from model output: auto (the worker's card, "
                        "else detected from the chat template), none, or one of "
                        f"{', '.join(sorted(TOOL_CALL_PARSERS))} [DYN_TOOL_CALL_PARSER] "
                        "(default: %(default)s)")
    p.add_argument("--reasoning-parser", default=env("DYN_REASONING_PARSER") or None,
                   choices=["none", *sorted(REASONING_PARSERS)], metavar="NAME",
                   help="split reasoning into reasoning_content: none or one of "
                        f"{', '.join(sorted(REASONING_PARSERS))} (default: the worker's card, "
                        "else none) [DYN_REASONING_PARSER]")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a request that has not finished after SECONDS and answer 504 "
                        "(default: no limit; a request's own timeout field can shorten it)")
    p.add_argument("--unsupported-fields", choices=["reject", "ignore"], default="reject",
                   help="a request field this server does not honour: reject (400 naming it) "
                        "or ignore it (default: %(default)s)")


def _http_args(p: argparse.ArgumentParser, port_default: int) -> None:
    p.add_argument("--host", default=os.environ.get("DYN_HTTP_HOST", "127.0.0.1"),
                   help="HTTP bind host [DYN_HTTP_HOST] (default: %(default)s)")
    p.add_argument("--port", type=int, default=port_default,
                   help="HTTP port, 0 = ephemeral (default: %(default)s)")


def _openai_config(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`FrontendConfig` fields of :func:`_openai_args` and the KV-router flags that
    ``frontend`` and ``run`` share."""
    return {"kv_events": args.kv_events, "router_ttl_secs": args.router_ttl_secs,
            "tool_call_parser": args.tool_call_parser,
            "reasoning_parser": args.reasoning_parser,
            "request_timeout": args.request_timeout,
            "unsupported_fields": args.unsupported_fields,
            "enforce_disagg": args.enforce_disagg}


def _cmd_frontend(args: argparse.Namespace, rest: list[str]) -> int:
    from ..frontend.server import FrontendConfig
    from ..log_setup import configure_logging
    from ..runtime.planes import resolve_discovery, resolve_events
    from .launcher import serve_frontend

    if rest:
        raise SystemExit(f"frontend: unknown arguments: {' '.join(rest)}")
    configure_logging()
    config = FrontendConfig(
        host=args.host, port=args.port,
        discovery=resolve_discovery(args.discovery, args.discovery_backend),
        events=resolve_events(args.events, args.event_plane), namespace=args.namespace or None,
        router_mode=args.router_mode, kv_overlap_weight=args.kv_overlap_weight,
        router_temperature=args.router_temperature, busy_threshold=args.busy_threshold,
        api_key=args.api_key, max_body_bytes=args.max_body_bytes, **_openai_config(args))
    if args.processes > 1 and not sys.platform.startswith("linux"):
        raise SystemExit("frontend: --processes > 1 needs Linux (SO_REUSEPORT)")
    return run_coroutine(serve_frontend(config, processes=args.processes,
                                        replica_sync=args.router_replica_sync))


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    from ..log_setup import configure_logging
    from .launcher import LocalRunConfig, run_local

    load_engine_class(args.engine)  # fail fast on a bad spec, before starting anything
    configure_logging(os.environ.get("DYN_LOG") or "warning")
    config = LocalRunConfig(
        engine=args.engine, engine_args=rest, model=args.model,
        served_model_name=args.served_model_name,
        workers=args.workers if args.workers is not None
        else (0 if args.prefill_workers or args.decode_workers else 1),
        prefill_workers=args.prefill_workers, decode_workers=args.decode_workers, host=args.host,
        port=args.port, router_mode=args.router_mode, kv_overlap_weight=args.kv_overlap_weight,
        router_temperature=args.router_temperature, api_key=args.api_key,
        migration_limit=args.migration_limit, namespace=args.namespace,
        start_timeout_s=args.start_timeout, worker_logs=args.worker_logs,
        frontend_options=_openai_config(args), frontend_processes=args.frontend_processes,
        replica_sync=args.router_replica_sync)
    if args.frontend_processes > 1 and not sys.platform.startswith("linux"):
        raise SystemExit("run: --frontend-processes > 1 needs Linux (SO_REUSEPORT)")
    return run_coroutine(run_local(config))


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main

    if rest:
        raise SystemExit(f"dynamo-backend bench: unknown arguments: {' '.join(rest)}")
    return bench_main(args)


_ENGINE_COMMANDS = ("worker", "run", "conformance")


def _reject_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit 2 (argparse's usage error) naming ``unknown``, the arguments before ``--`` that
    ``parser`` did not take, with the closest real flag for each typo or abbreviation."""
    flags = [o for a in parser._actions for o in a.option_strings]
    hints = []
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                hints.append(f"{arg.split('=', 1)[0]}: did you mean {close[0]}?")
    msg = "; ".join([f"unrecognized arguments: {' '.join(unknown)}", *hints])
    if command in _ENGINE_COMMANDS:
        msg += (f"; engine flags go after --: dynamo-backend {command} --engine SPEC "
                f"[{command} flags] -- [engine flags]")
    parser.error(msg)


def build_parser() -> argparse.ArgumentParser:
    from ..worker.config import SERVED_MODEL_NAME_HELP, add_worker_args

    parser = argparse.ArgumentParser(
        prog="dynamo-backend",
        description="Serve LLM engines: workers, the OpenAI frontend, the one-command server, "
        "conformance checks, a load generator.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    w = sub.add_parser(
        "worker",
        help="serve one engine as a worker",
        description="Serve one engine as a worker. Arguments after -- go to the engine's "
        "from_args(); an unknown flag before -- is an error.",
    )
    w.add_argument("--engine", required=True,
                   help="echo | mocker | package.module:Class | path/file.py:Class")
    add_worker_args(w)
    w.set_defaults(func=_cmd_worker, command_parser=w)
    c = sub.add_parser(
        "conformance",
        help="check an engine against the LLMEngine contract",
        description="Run the conformance kit against an engine and print the report; exit 1 "
        "on any failure. Arguments after -- go to the engine's from_args().",
    )
    c.add_argument("--engine", required=True,
                   help="echo | mocker | package.module:Class | path/file.py:Class")
    c.add_argument("--start-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long the engine's start() may take (default: --timeout); raise it "
                        "for an engine that loads weights")
    c.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="bound on every other step of a check: one stream or batch of streams, "
                        "each cleanup() (default: %(default)s)")
    c.set_defaults(func=_cmd_conformance, command_parser=c)
    c.allow_abbrev = False

    f = sub.add_parser(
        "frontend",
        help="serve the OpenAI-compatible HTTP API for workers found through discovery",
        description="OpenAI-compatible frontend (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /live, /metrics). Workers register in discovery; models appear "
        "and disappear with them.",
    )
    _http_args(f, int(os.environ.get("DYN_HTTP_PORT") or 8000))
    f.add_argument("--discovery", default=os.environ.get("DYN_DISCOVERY", ""),
                   help="discovery URL: file://[DIR] (default), etcd://HOST:PORT, memory:// "
                        "[DYN_DISCOVERY]")
    f.add_argument("--events", default=os.environ.get("DYN_EVENTS", ""),
                   help="event plane URL for kv mode: zmq:// (default), nats://HOST:PORT "
                        "[DYN_EVENTS]")
    add_plane_args(f, request_plane=False)
    f.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", ""),
                   help="only serve workers of this namespace (default: all) [DYN_NAMESPACE]")
    _router_args(f)
    f.add_argument("--busy-threshold", type=float, default=None,
                   help="kv mode: skip workers whose KV usage is above this fraction")
    f.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted, 413 beyond (default: %(default)s)")
    f.add_argument("--processes", type=_processes, default=1, metavar="N",
                   help="frontend processes sharing the port (Linux, SO_REUSEPORT): this one "
                        "and N-1 children, each a full frontend; /metrics from any of them "
                        "shows them all (default: %(default)s)")
    f.set_defaults(func=_cmd_frontend, command_parser=f)
    f.allow_abbrev = False

    r = sub.add_parser(
        "run",
        help="one command: N workers plus the frontend on this machine",
        description="Start N worker subprocesses for an engine and serve them through the "
        "OpenAI-compatible frontend; prints the URL once every worker is ready. Arguments "
        "after -- go to the engine.",
    )
    r.add_argument("--engine", required=True,
                   help="echo | mocker | package.module:Class | path/file.py:Class")
    r.add_argument("--model", default=None,
                   help="model directory (HF layout: tokenizer.json, tokenizer_config.json); "
                        "default: the bundled tiny model")
    r.add_argument("--served-model-name",
                   default=os.environ.get("DYN_SERVED_MODEL_NAME", "").strip() or None,
                   help=SERVED_MODEL_NAME_HELP)  # the worker's rule, told once
    r.add_argument("--workers", type=int, default=None,
                   help="aggregated worker processes (default: 1, or 0 with --prefill-workers "
                        "/ --decode-workers)")
    r.add_argument("--prefill-workers", type=int, default=0, metavar="N",
                   help="disaggregated serving: N workers with --disaggregation-mode prefill "
                        "(default: %(default)s)")
    r.add_argument("--decode-workers", type=int, default=0, metavar="M",
                   help="disaggregated serving: M workers with --disaggregation-mode decode "
                        "(default: %(default)s)")
    r.add_argument("--frontend-processes", type=_processes, default=1, metavar="N",
                   help="frontend processes sharing the port (Linux), as frontend --processes "
                        "(default: %(default)s)")
    _http_args(r, 8000)
    _router_args(r)
    r.add_argument("--migration-limit", type=int, default=3,
                   help="times a broken stream may move to another worker (default: 3)")
    r.add_argument("--namespace", default="dynamo", help=argparse.SUPPRESS)
    r.add_argument("--start-timeout", type=float, default=60.0,
                   help="seconds to wait for the workers to register (default: %(default)s)")
    r.add_argument("--worker-logs", action="store_true",
                   help="copy all the workers' logs to stderr (default: only their warnings and "
                        "errors, at most 10 lines per second per worker; the last lines are "
                        "always shown when one fails)")
    r.set_defaults(func=_cmd_run, command_parser=r)
    # A typo or abbreviation of our flags is an error (main), not silently an engine flag.
    r.allow_abbrev = False

    from .bench import add_bench_args

    b = sub.add_parser(
        "bench",
        help="load-test a running OpenAI-compatible server",
        description="Keep N streaming chat completions in flight per concurrency level and "
        "print requests/s, output tokens/s, TTFT and ITL p50/p99 per level; exit 1 if any "
        "request failed.",
    )
    add_bench_args(b)
    b.set_defaults(func=_cmd_bench, command_parser=b)
    b.allow_abbrev = False
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit code.

    Everything after the first ``--`` is the engine's; before it, every argument must be one
    of the subcommand's flags (never abbreviated), else argparse's usage error (exit 2).
    """
    parser = build_parser()
    mine, engine_argv = _split_engine_args(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(mine)
    if args.command is None:
        parser.print_help()
        return 2
    if unknown:
        _reject_unknown(args.command_parser, args.command, unknown)
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    return func(args, engine_argv)
