"""Worker configuration: :class:`WorkerConfig`, :class:`ShutdownConfig` and the shared CLI flags.

Every flag has a ``DYN_*`` environment fallback; an explicit flag beats the environment, which
beats the built-in default. Durations follow Dynamo's parsing rules: values are trimmed, empty
means unset, non-finite or absurd values are rejected with a warning.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.planes import REQUEST_PLANES, add_plane_args, resolve_discovery, resolve_events

log = logging.getLogger(__name__)

#: ``--served-model-name``'s help, the same text under ``worker`` and ``run`` (one rule, told
#: once; docs/worker.md "Served model name" says it at length).
SERVED_MODEL_NAME_HELP = (
    "the model name clients send [DYN_SERVED_MODEL_NAME]. Default under run: the model "
    "directory's name (config.json's _name_or_path, else the folder name), which run passes "
    "to each worker. Default under worker: the engine's EngineConfig.served_model_name, else "
    "EngineConfig.model (--model-path does not name the model)")

MAX_CONFIGURED_SECS = 315_360_000.0


class DisaggregationMode(enum.Enum):
    """The worker's role. ``prefill`` workers only compute KV; ``decode`` ones continue them."""

    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"

    @classmethod
    def parse(cls, value: str) -> DisaggregationMode:
        v = value.strip().lower()
        if v in ("agg", "aggregated", ""):
            return cls.AGGREGATED
        try:
            return cls(v)
        except ValueError:
            raise ValueError(
                f"invalid disaggregation mode {value!r}; expected agg|aggregated|prefill|decode"
            ) from None


def env_secs(name: str, environ: Mapping[str, str] | None = None) -> float | None:
    """Parse a duration env var: trimmed, empty = unset, finite and <= ~10 years or ``None``."""
    raw = (environ if environ is not None else os.environ).get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > MAX_CONFIGURED_SECS:
        log.warning("%s=%r: invalid or out-of-range duration; using default", name, raw)
        return None
    return value


@dataclass
class ShutdownConfig:
    """Graceful-shutdown timing. ``None`` fields fall back to env vars, then defaults.

    Stages run in order ``unregister -> router_grace -> stop_admission -> inflight ->
    kv_transfer -> cleanup`` under one total budget armed at the signal.
    """

    total_secs: float | None = None
    router_grace_secs: float | None = None
    inflight_timeout_secs: float | None = None
    kv_transfer_timeout_secs: float | None = None
    cleanup_timeout_secs: float | None = None

    def resolved(self, environ: Mapping[str, str] | None = None) -> ResolvedShutdown:
        env = environ if environ is not None else os.environ

        def pick(value: float | None, *names: str) -> float | None:
            if value is not None:
                return value
            for n in names:
                v = env_secs(n, env)
                if v is not None:
                    return v
            return None

        grace = pick(
            self.router_grace_secs,
            "DYN_WORKER_SHUTDOWN_ROUTER_GRACE_SECS",
            "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
        )
        inflight = pick(self.inflight_timeout_secs, "DYN_WORKER_SHUTDOWN_INFLIGHT_TIMEOUT_SECS")
        kv = pick(
            self.kv_transfer_timeout_secs,
            "DYN_WORKER_SHUTDOWN_KV_TRANSFER_TIMEOUT_SECS",
            "DYN_PREFILL_DRAIN_TIMEOUT_S",
        )
        cleanup = pick(self.cleanup_timeout_secs, "DYN_WORKER_SHUTDOWN_CLEANUP_TIMEOUT_SECS")
        if cleanup is not None and cleanup <= 0:
            log.warning("non-positive cleanup timeout %s ignored; using the default", cleanup)
            cleanup = None
        total = pick(
            self.total_secs,
            "DYN_WORKER_SHUTDOWN_TOTAL_TIMEOUT_SECS",
            "DYN_WORKER_GRACEFUL_SHUTDOWN_TIMEOUT",
        )
        if total is not None and total <= 0:
            total = None
        return ResolvedShutdown(
            total=total if total is not None else 30.0,
            router_grace=max(0.0, grace if grace is not None else 5.0),
            inflight=max(0.0, inflight) if inflight is not None else math.inf,
            kv_transfer=max(0.0, kv if kv is not None else 30.0),
            cleanup=cleanup if cleanup is not None else 5.0,
        )


@dataclass(frozen=True)
class ResolvedShutdown:
    total: float
    router_grace: float
    inflight: float
    kv_transfer: float
    cleanup: float


@dataclass
class WorkerConfig:
    """Everything the worker needs besides the engine. Build it in code or with
    :func:`add_worker_args` + :meth:`from_args`.
    """

    namespace: str = "dynamo"
    component: str = "backend"
    endpoint: str = "generate"
    #: Model directory (Hugging Face layout) advertised to frontends for tokenization;
    #: empty = name-only registration.
    model_path: str = ""
    #: Public model name; beats ``EngineConfig.served_model_name`` and ``EngineConfig.model``.
    served_model_name: str | None = None
    endpoint_types: str = "chat,completions"
    disaggregation_mode: DisaggregationMode = DisaggregationMode.AGGREGATED
    #: Discovery URL: ``file://[dir]`` (default), ``etcd://host:port``, ``memory://[name]``.
    discovery: str | None = None
    #: Event-plane URL: ``zmq://`` (default with file discovery), ``nats://host:port``,
    #: ``memory://``.
    events: str | None = None
    #: Request-plane protocol: ``"tcp"`` (Dynamo 1.6.1's TCP request plane, the default: a
    #: Dynamo frontend can call this worker) or ``"mux"`` (our private multiplexed protocol,
    #: understood by our frontend only).
    request_plane: str = "tcp"
    #: With ``request_plane="tcp"``, also serve our multiplexed plane on a second port and
    #: advertise it in the instance record's ``mux`` field: our frontends take it (one shared
    #: connection instead of one per request), Dynamo's ignore it.
    mux_fastpath: bool = True
    #: Request-plane bind host/port (port 0 = ephemeral) and the host advertised to frontends.
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    #: Status server (``/metrics``, ``/health``, ``/live``); ``None`` disables it.
    status_host: str = "127.0.0.1"
    status_port: int | None = 0
    #: Canary override (beats the engine's ``health_check_payload``).
    health_check_payload: dict[str, Any] | None = None
    health_check_interval_secs: float = 10.0
    health_check_timeout_secs: float = 10.0
    #: How many times a frontend may move a broken stream to another worker.
    migration_limit: int = 3
    #: Parser names advertised in the card (Dynamo's ``tool_call_parser`` /
    #: ``reasoning_parser``): frontends read this model's tool calls / reasoning with them.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_kv_routing: bool = True
    metrics_labels: dict[str, str] = field(default_factory=dict)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)

    def validate(self) -> None:
        problems = []
        for name in ("namespace", "component", "endpoint"):
            value = getattr(self, name)
            if not value or any(c in value for c in "/. \t"):
                problems.append(f"{name} must be non-empty without '/', '.' or spaces: {value!r}")
        if not 0 <= self.port < 65536:
            problems.append(f"port out of range: {self.port}")
        if self.status_port is not None and not 0 <= self.status_port < 65536:
            problems.append(f"status_port out of range: {self.status_port}")
        if self.migration_limit < 0:
            problems.append("migration_limit must be >= 0")
        if self.request_plane not in REQUEST_PLANES:
            problems.append(f"request_plane must be one of {', '.join(REQUEST_PLANES)}: "
                            f"{self.request_plane!r}")
        if self.model_path and not os.path.isdir(self.model_path):
            problems.append(f"model_path {self.model_path!r} is not a directory (a Hugging Face "
                            "model directory: tokenizer.json, config.json, ...)")
        if problems:
            raise ValueError("invalid WorkerConfig: " + "; ".join(problems))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        """Build from a namespace produced by a parser that :func:`add_worker_args` set up."""
        mode = DisaggregationMode.parse(args.disaggregation_mode)
        cfg = cls(
            namespace=args.namespace,
            component=args.component or (
                "prefill" if mode is DisaggregationMode.PREFILL else "backend"),
            endpoint=args.endpoint,
            model_path=args.model_path or "",
            served_model_name=args.served_model_name or None,
            endpoint_types=args.endpoint_types,
            disaggregation_mode=mode,
            discovery=resolve_discovery(args.discovery, args.discovery_backend),
            events=resolve_events(args.events, args.event_plane),
            request_plane=args.request_plane,
            mux_fastpath=args.mux_fastpath,
            host=args.host,
            port=args.port,
            advertise_host=args.advertise_host or None,
            status_host=args.system_host,
            status_port=None if args.system_port < 0 else args.system_port,
            health_check_payload=_payload_arg(args.health_check_payload),
            migration_limit=args.migration_limit,
            tool_call_parser=args.tool_call_parser or None,
            reasoning_parser=args.reasoning_parser or None,
            enable_kv_routing=args.enable_kv_routing,
            metrics_labels=dict(_parse_label(x) for x in args.metrics_label),
            shutdown=ShutdownConfig(router_grace_secs=args.graceful_shutdown_grace_secs),
        )
        cfg.validate()
        return cfg


def parse_health_check_payload(value: str) -> dict[str, Any]:
    """A JSON object, or ``@path`` to a file holding one. Raises ``ValueError`` otherwise."""
    text = value.strip()
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"health check payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("health check payload must be a JSON object")
    return obj


def _payload_arg(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``--health-check-payload`` as parsed (a dict) or as given (a string, from code)."""
    if value is None or isinstance(value, dict):
        return value
    return parse_health_check_payload(value) if value.strip() else None


def _payload_type(value: str) -> dict[str, Any]:
    try:
        return parse_health_check_payload(value)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def env_health_check_payload() -> dict[str, Any] | None:
    """``DYN_HEALTH_CHECK_PAYLOAD``; an invalid value is logged and ignored."""
    raw = os.environ.get("DYN_HEALTH_CHECK_PAYLOAD", "").strip()
    if not raw:
        return None
    try:
        return parse_health_check_payload(raw)
    except (ValueError, OSError) as exc:
        log.warning("DYN_HEALTH_CHECK_PAYLOAD ignored: %s", exc)
        return None


def _parse_label(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"metrics label must be KEY=VALUE, got {item!r}")
    return key, value


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in ("1", "true", "yes", "on")


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_worker_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags every worker shares (``CommonArgs``), each with its ``DYN_*`` fallback.

    Also turns off ``parser``'s abbreviation matching: flags the worker does not know belong to
    the engine, and an engine flag that happens to prefix a worker flag (``--model`` of
    ``--model-path``, ``--event`` of ``--events``) must reach the engine, not be taken silently.
    """
    parser.allow_abbrev = False
    g = parser.add_argument_group("worker (env fallback in brackets)")
    g.add_argument("--namespace", default=_env("DYN_NAMESPACE", "dynamo"),
                   help="discovery namespace [DYN_NAMESPACE] (default: %(default)s)")
    g.add_argument("--component", default=_env("DYN_COMPONENT", "") or None,
                   help="component name within the namespace [DYN_COMPONENT] (default: "
                        "backend, or prefill with --disaggregation-mode prefill, as Dynamo's "
                        "workers register)")
    g.add_argument("--endpoint", default=_env("DYN_ENDPOINT", "generate"),
                   help="serving endpoint name [DYN_ENDPOINT] (default: %(default)s)")
    g.add_argument("--model-path", default=_env("DYN_MODEL_PATH", ""),
                   help="model directory (HF layout: tokenizer.json, tokenizer_config.json) "
                        "advertised to frontends for tokenization [DYN_MODEL_PATH]")
    g.add_argument("--served-model-name", default=_env("DYN_SERVED_MODEL_NAME", ""),
                   help=SERVED_MODEL_NAME_HELP)
    g.add_argument("--tool-call-parser", "--dyn-tool-call-parser", dest="tool_call_parser",
                   default=_env("DYN_TOOL_CALL_PARSER", ""), metavar="NAME",
                   help="tool-call parser frontends use for this model (hermes, llama3_json, "
                        "mistral, pythonic, ...), advertised in the card [DYN_TOOL_CALL_PARSER]")
    g.add_argument("--reasoning-parser", "--dyn-reasoning-parser", dest="reasoning_parser",
                   default=_env("DYN_REASONING_PARSER", ""), metavar="NAME",
                   help="reasoning parser frontends use for this model (deepseek_r1, qwen3, "
                        "...), advertised in the card [DYN_REASONING_PARSER]")
    g.add_argument("--endpoint-types", default=_env("DYN_ENDPOINT_TYPES", "chat,completions"),
                   help="comma list of OpenAI endpoints served [DYN_ENDPOINT_TYPES] "
                        "(default: %(default)s)")
    g.add_argument("--disaggregation-mode", default=_env("DYN_DISAGGREGATION_MODE", "agg"),
                   help="agg|prefill|decode [DYN_DISAGGREGATION_MODE] (default: %(default)s)")
    g.add_argument("--discovery", default=_env("DYN_DISCOVERY", ""),
                   help="discovery URL: file://[DIR] (default, one machine), etcd://HOST:PORT, "
                        "memory:// [DYN_DISCOVERY]")
    g.add_argument("--events", default=_env("DYN_EVENTS", ""),
                   help="event plane URL for KV events and load: zmq:// (default), "
                        "nats://HOST:PORT, memory:// [DYN_EVENTS]")
    add_plane_args(g)
    g.add_argument("--host", default=_env("DYN_TCP_RPC_HOST", "127.0.0.1"),
                   help="request-plane bind host [DYN_TCP_RPC_HOST] (default: %(default)s)")
    g.add_argument("--port", type=int, default=_env_int("DYN_TCP_RPC_PORT", 0),
                   help="request-plane port, 0 = ephemeral [DYN_TCP_RPC_PORT]")
    g.add_argument("--advertise-host", default=_env("DYN_TCP_RPC_ADVERTISE_HOST", ""),
                   help="host advertised to frontends (and in the status URL); default: the "
                        "bind host, or this machine's primary address when binding 0.0.0.0 "
                        "or :: [DYN_TCP_RPC_ADVERTISE_HOST]")
    g.add_argument("--system-host", default=_env("DYN_SYSTEM_HOST", "127.0.0.1"),
                   help="status server host for /metrics /health /live [DYN_SYSTEM_HOST]")
    g.add_argument("--system-port", type=int, default=_env_int("DYN_SYSTEM_PORT", 0),
                   help="status server port, 0 = ephemeral, -1 = disabled [DYN_SYSTEM_PORT]")
    # No env default here: the worker reads DYN_HEALTH_CHECK_PAYLOAD itself when the flag is
    # absent, and (as Dynamo does) warns about and ignores an invalid value instead of failing.
    g.add_argument("--health-check-payload", type=_payload_type, default=None,
                   metavar="JSON|@FILE",
                   help="canary request as JSON or @file, overrides the engine's "
                        "[DYN_HEALTH_CHECK_PAYLOAD]")
    g.add_argument("--migration-limit", type=int, default=_env_int("DYN_MIGRATION_LIMIT", 3),
                   help="times a frontend may move a broken stream to another worker "
                        "[DYN_MIGRATION_LIMIT] (default: %(default)s)")
    g.add_argument("--mux-fastpath", type=_bool, default=_env_bool("DYN_MUX_FASTPATH", True),
                   metavar="BOOL",
                   help="with --request-plane tcp, also serve our multiplexed plane for our "
                        "frontends (Dynamo's use tcp) [DYN_MUX_FASTPATH] (default: %(default)s)")
    g.add_argument("--enable-kv-routing", type=_bool,
                   default=_env_bool("DYN_ENABLE_KV_ROUTING", True), metavar="BOOL",
                   help="publish KV events and load snapshots [DYN_ENABLE_KV_ROUTING] "
                        "(default: %(default)s)")
    g.add_argument("--metrics-label", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Prometheus label on worker metrics (repeatable)")
    g.add_argument("--graceful-shutdown-grace-secs", type=float, default=None,
                   help="time to keep serving after unregistering on SIGTERM "
                        "[DYN_WORKER_SHUTDOWN_ROUTER_GRACE_SECS, then "
                        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS] (default: 5)")
    return parser


def worker_config_from_argv(argv: Sequence[str] | None = None) -> WorkerConfig:
    """Parse only the shared worker flags (a convenience for scripts)."""
    parser = add_worker_args(argparse.ArgumentParser(prog="dynamo-backend worker"))
    return WorkerConfig.from_args(parser.parse_args(argv))
