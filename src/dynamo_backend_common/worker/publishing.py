"""What a worker publishes on the event plane: its engine's KV events and load snapshots.

KV events (one message per loop turn, a list of ``RouterEvent`` as Dynamo sends them) go to
``kv_events_subject``; per-rank load snapshots to ``kv_metrics_subject`` as Dynamo's
``ActiveLoad``. Routers index both (KV-aware routing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..engine import ComponentSnapshot, EngineConfig, LLMEngine, PushKvEventSource, ZmqKvEventSource
from ..errors import DynamoError
from ..protocols.kv import LoadSnapshot, RouterEvent, encode_kv_events, encode_load
from ..runtime.events import EventPlane, kv_events_subject, kv_metrics_subject
from ..runtime.publishers import KvEventPublisher
from .config import WorkerConfig

log = logging.getLogger("dynamo_backend_common.worker")

__all__ = ["KV_BATCH_MAX", "load_sink", "start_kv_events"]

#: Most KV events in one event-plane message.
KV_BATCH_MAX = 1024


def load_sink(events: EventPlane, cfg: WorkerConfig, worker_id: int,
              on_snapshot: Callable[[ComponentSnapshot], None]) -> Callable[[Any], None]:
    """The sink of the engine's snapshot publisher: ``on_snapshot`` (the worker's gauges)
    then, with KV routing on, the snapshot as Dynamo's ``ActiveLoad`` (plus our
    ``kv_total_blocks`` when known) on the event plane."""
    subject = kv_metrics_subject(cfg.namespace, cfg.component)
    kv_routing = cfg.enable_kv_routing
    if kv_routing:
        events.prepare_publish(subject)  # routers connect before the first load

    def sink(snap: Any) -> None:
        on_snapshot(snap)
        if kv_routing:
            events.publish(subject, encode_load(LoadSnapshot(
                worker_id=worker_id,
                dp_rank=snap.dp_rank,
                kv_used_blocks=snap.kv_used_blocks,
                kv_total_blocks=snap.kv_total_blocks or None,
            )))

    return sink


async def start_kv_events(engine: LLMEngine, engine_cfg: EngineConfig, events: EventPlane,
                          cfg: WorkerConfig, worker_id: int, loop: asyncio.AbstractEventLoop
                          ) -> tuple[list[KvEventPublisher], list[Any]] | None:
    """Connect every KV event source of the engine to the event plane: a
    :class:`KvEventPublisher` per source (handed to a push source, fed by a relay for a ZMQ
    one). Returns the publishers and relays (the caller closes them), or ``None`` when the
    engine publishes no KV events (none declared, or no ``kv_cache_block_size``)."""
    sources = await engine.kv_event_sources()
    if not sources:
        return None
    block_size = engine_cfg.kv_cache_block_size
    if block_size is None:
        log.warning("engine declared KV event sources without kv_cache_block_size; "
                    "KV events are not published")
        return None
    subject = kv_events_subject(cfg.namespace, cfg.component)
    events.prepare_publish(subject)

    # Events produced together (one engine step, one relayed batch: the same loop turn) go
    # out as one message, a list of RouterEvent as Dynamo sends them (at most KV_BATCH_MAX
    # per message).
    pending: list[RouterEvent] = []

    def flush() -> None:
        if pending:
            batch = pending[:]
            pending.clear()
            events.publish(subject, encode_kv_events(batch))

    def sink(event: RouterEvent) -> None:
        if not pending:
            loop.call_soon(flush)
        pending.append(event)
        if len(pending) >= KV_BATCH_MAX:
            flush()

    publishers: list[KvEventPublisher] = []
    relays: list[Any] = []
    for source in sources:
        publisher = KvEventPublisher(worker_id, source.dp_rank, sink, loop)
        publishers.append(publisher)
        if isinstance(source, PushKvEventSource):
            source.on_ready(publisher)
        elif isinstance(source, ZmqKvEventSource):
            from .zmq_kv_relay import ZmqKvEventRelay

            relay = ZmqKvEventRelay(source, publisher, block_size=block_size)
            await relay.start()
            relays.append(relay)
        else:
            raise DynamoError.invalid_argument(f"unknown KV event source {source!r}")
    log.info("publishing KV events for dp ranks %s", [s.dp_rank for s in sources])
    return publishers, relays
