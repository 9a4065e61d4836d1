"""What a worker registers in discovery: its instance record and its model card.

Dynamo 1.6.1's records (:mod:`~dynamo_backend_common.protocols.discovery`): the ``Endpoint``
instance (the request-plane address, the mux fast path, the status URL) and the ``Model`` card,
whose ``card_json`` names the model directory's files with blake3 checksums, served from the
status server at ``/v1/metadata/...`` so frontends on other hosts can fetch them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ..engine import EngineConfig
from ..protocols.codec import to_json
from ..protocols.discovery import (
    InstanceInfo,
    ModelCard,
    ModelDeploymentCard,
    RuntimeConfig,
    checked_files,
    endpoint_path,
    slugify,
)
from ..runtime.status_server import StatusServer
from .config import DisaggregationMode, WorkerConfig

log = logging.getLogger("dynamo_backend_common.worker")

__all__ = ["build_instance_info", "build_model_card", "metadata_base", "reachable_host",
           "serve_metadata"]


def metadata_base(cfg: WorkerConfig, status_port: int | None, display_name: str) -> str | None:
    """Where the status server serves the model files (Dynamo's ``/v1/metadata/...``), so
    frontends on other hosts can fetch them; ``None`` (local paths in the card) without a
    status server or with ``DYN_SELF_HOST_METADATA=0``."""
    if status_port is None or os.environ.get("DYN_SELF_HOST_METADATA", "1").strip() in (
            "0", "false", "no", "off"):
        return None
    host = reachable_host(cfg.status_host, cfg.advertise_host)
    return (f"http://{host}:{status_port}/v1/metadata/{cfg.namespace}/"
            f"{cfg.component}/{cfg.endpoint}/{slugify(display_name)}/_base")


def serve_metadata(status: StatusServer, cfg: WorkerConfig, card: ModelCard) -> None:
    """GET routes on ``status`` for every card file that names a URL on it."""
    if not cfg.model_path:
        return
    prefix = f"http://{reachable_host(cfg.status_host, cfg.advertise_host)}:{status.port}"
    root = os.path.abspath(cfg.model_path)
    for name, cf in card.card_json.files().items():
        if not cf.path.startswith(prefix + "/"):
            continue
        file_path = os.path.join(root, name)

        async def serve(_body: bytes, file_path: str = file_path) -> tuple[int, str, bytes]:
            try:
                data = await asyncio.to_thread(Path(file_path).read_bytes)
            except OSError as exc:
                return 404, "application/json", to_json(
                    {"status": "error", "message": str(exc)})
            return 200, "application/octet-stream", data

        status.add_route("GET", cf.path[len(prefix):], serve)


def build_instance_info(cfg: WorkerConfig, worker_id: int, address: str,
                        mux_address: str | None, status_port: int | None) -> InstanceInfo:
    """The ``Endpoint`` record: how frontends reach this worker's request plane (``address``
    is the bound ``host:port``), its mux fast path and its status server."""
    bind_host, _, port = address.rpartition(":")
    advertise = cfg.advertise_host or reachable_host(bind_host)
    path = endpoint_path(worker_id, cfg.namespace, cfg.component, cfg.endpoint)
    return InstanceInfo(
        namespace=cfg.namespace,
        component=cfg.component,
        endpoint=cfg.endpoint,
        instance_id=worker_id,
        # A mux worker advertises its private protocol under its own transport name, so a
        # Dynamo frontend never mistakes it for its TCP request plane.
        transport=({"tcp": f"{advertise}:{port}/{path}"}
                   if cfg.request_plane == "tcp" else
                   {"mux": f"{advertise}:{port}/{cfg.endpoint}"}),
        request_plane_codec="msgpack",
        mux=(f"{advertise}:{mux_address.rpartition(':')[2]}/{cfg.endpoint}"
             if mux_address is not None else None),
        status_url=(f"http://{reachable_host(cfg.status_host, cfg.advertise_host)}:"
                    f"{status_port}" if status_port is not None else None),
    )


def build_model_card(cfg: WorkerConfig, engine_cfg: EngineConfig, worker_id: int, *,
                     display_name: str, files_url_base: str | None,
                     publishes_kv_events: bool, controls: list[str]) -> ModelCard:
    """The model card registered for a worker: Dynamo's ``v1/mdc`` record, whose
    ``card_json`` names the model directory's files with blake3 checksums (at
    ``files_url_base`` when the status server serves them, else their local paths)."""
    mode = cfg.disaggregation_mode
    files = (checked_files(cfg.model_path, url_base=files_url_base)
             if cfg.model_path else {})
    types = [t.strip().lower() for t in cfg.endpoint_types.split(",") if t.strip()]
    names = {"chat": "Chat", "completions": "Completions", "completion": "Completions"}
    model_type = " | ".join(names[t] for t in types if t in names) or "Chat | Completions"
    tool_parser, reasoning_parser = cfg.tool_call_parser, cfg.reasoning_parser
    if mode is DisaggregationMode.PREFILL:
        # No OpenAI surface of its own (frontends tell a prefill worker by ``worker_type``), and
        # no model type at all, as Dynamo 1.6.1's prefill workers register (``ModelType``
        # empty, ``""`` on the wire): its frontend keys a worker set by this string too, and
        # allows one prefill worker set per model, so a prefill pool mixing its workers and
        # ours must agree on it (with ``"Prefill"`` the model is never served). Output parsing
        # belongs to the decode worker's card.
        model_type = ""
        tool_parser = reasoning_parser = None
    # Which role the model needs besides this one (Dynamo's topology: OR of AND-groups), as
    # Dynamo 1.6.1's workers write it. Its frontend serves a decode-only model only once a
    # prefill worker is there, and ``needs`` enters the card checksum: a decode pool mixing
    # its workers and ours must agree on it.
    needs: list[list[str]] = []
    if mode is DisaggregationMode.PREFILL:
        needs = [[DisaggregationMode.DECODE.value]]
    elif mode is DisaggregationMode.DECODE:
        needs = [[DisaggregationMode.PREFILL.value]]
    disagg = None
    if engine_cfg.bootstrap_host is not None and engine_cfg.bootstrap_port is not None:
        disagg = {"bootstrap_host": engine_cfg.bootstrap_host,
                  "bootstrap_port": engine_cfg.bootstrap_port}
    card = ModelCard(
        namespace=cfg.namespace,
        component=cfg.component,
        endpoint=cfg.endpoint,
        instance_id=worker_id,
        card_json=ModelDeploymentCard(
            display_name=display_name,
            slug=slugify(display_name),
            model=engine_cfg.model,
            source_path=os.path.abspath(cfg.model_path) if cfg.model_path else None,
            architectural_max_context_length=_model_context_length(cfg.model_path),
            context_length=engine_cfg.context_length or 0,
            model_type=model_type,
            worker_type=mode.value,
            needs=needs,
            # Dynamo requires a block size; 16 (its default) when the engine has no KV cache
            # to report.
            kv_cache_block_size=engine_cfg.kv_cache_block_size or 16,
            migration_limit=cfg.migration_limit,
            runtime_config=RuntimeConfig(
                # 0 when the engine reports none, as Dynamo's workers write it: the value
                # enters the card checksum, so a pool mixing them must agree on it.
                context_length=engine_cfg.context_length or 0,
                total_kv_blocks=engine_cfg.total_kv_blocks,
                max_num_seqs=engine_cfg.max_num_seqs,
                max_num_batched_tokens=engine_cfg.max_num_batched_tokens,
                tool_call_parser=tool_parser,
                reasoning_parser=reasoning_parser,
                data_parallel_size=engine_cfg.data_parallel_size or 1,
                data_parallel_start_rank=engine_cfg.data_parallel_start_rank or 0,
                kv_event_publishing_enabled=publishes_kv_events,
                runtime_data=dict(engine_cfg.runtime_data),
                disaggregated_endpoint=disagg,
                supported_controls=list(controls),
            ),
        ),
    )
    for field_name, group in files.items():
        setattr(card.card_json, field_name, group)
    return card


def _model_context_length(model_path: str) -> int | None:
    if not model_path:
        return None
    from ..model_dir import ModelDirError, model_context_length

    try:
        return model_context_length(model_path)
    except ModelDirError as exc:
        log.warning("model directory: %s", exc)
        return None


_WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def reachable_host(bind_host: str, advertise_host: str | None = None) -> str:
    """The host to advertise for a server bound to ``bind_host``.

    A wildcard bind (``0.0.0.0``, ``::``) is not an address anyone can connect to: advertise
    ``advertise_host`` if given, else this machine's primary address (the source address of
    the default route; no packet is sent), else its hostname's address, else loopback.
    """
    if bind_host not in _WILDCARDS:
        return bind_host
    if advertise_host:
        return advertise_host
    import socket

    v6 = bind_host in ("::", "[::]")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(("2001:db8::1" if v6 else "192.0.2.1", 9))  # TEST-NET: never routed
            addr = str(s.getsockname()[0])
    except OSError:
        try:
            addr = socket.gethostbyname(socket.gethostname())
            v6 = False
        except OSError:
            addr = "::1" if v6 else "127.0.0.1"
    return f"[{addr}]" if v6 else addr
