"""Tracks which models are served by which workers, from discovery.

Watches ``v1/mdc/`` (model cards) and ``v1/instances/`` (request-plane addresses). A model is
listed while at least one worker with both a card and an instance entry serves it; it disappears
when its last worker leaves. The tokenizer/preprocessor of a model is loaded once, from the first
card's ``source_path``.

Workers registered with ``worker_type`` ``prefill`` (``--disaggregation-mode prefill``) are kept
apart, in :attr:`ModelManager.prefill`: they serve no OpenAI route and never receive a normal
request; only the prefill router (:mod:`.disagg`) sends them work. A model served only by
prefill workers is not listed. ``aggregated`` and ``decode`` workers form the serving pool
(:attr:`ModelManager.models`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import ProtocolError
from ..protocols.codec import from_json
from ..protocols.discovery import INSTANCES_PREFIX, MODELS_PREFIX, InstanceInfo, ModelCard
from ..runtime.discovery import Discovery, DiscoveryEvent
from ..runtime.tasks import TaskSet

log = logging.getLogger("dynamo_backend_common.frontend")

T = TypeVar("T")


@dataclass
class WorkerEntry:
    instance_id: int
    card: ModelCard
    info: InstanceInfo

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def endpoint(self) -> str:
        return self.info.endpoint


@dataclass
class ModelEntry:
    """One served model and the workers serving it (keyed by instance id)."""

    name: str
    card: ModelCard
    workers: dict[int, WorkerEntry] = field(default_factory=dict)
    created: int = 0


PREFILL_WORKER_TYPE = "prefill"
DECODE_WORKER_TYPE = "decode"


class WorkerPool:
    """Models and the workers serving them in one role, with join/leave listeners."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.models: dict[str, ModelEntry] = {}
        self._listeners: list[Callable[[str, WorkerEntry, bool], None]] = []

    def add_listener(self, fn: Callable[[str, WorkerEntry, bool], None]) -> None:
        """``fn(model_name, worker, added)`` on every worker joining or leaving a model."""
        self._listeners.append(fn)

    def _sync(self, wanted: dict[str, dict[int, WorkerEntry]],
              cards: dict[str, ModelCard]) -> None:
        # Diff against the current view so listeners see precise joins and leaves.
        for name, entry in list(self.models.items()):
            now = wanted.get(name, {})
            for iid, w in list(entry.workers.items()):
                if iid not in now:
                    del entry.workers[iid]
                    self._notify(name, w, False)
            if not now:
                del self.models[name]
                log.info("model %s removed from the %s pool (no workers left)", name,
                         self.role)
        for name, workers in wanted.items():
            current = self.models.get(name)
            if current is None:
                current = self.models[name] = ModelEntry(name, cards[name], {}, int(time.time()))
                log.info("model %s added (%s pool)", name, self.role)
            for iid, w in workers.items():
                if iid not in current.workers:
                    current.workers[iid] = w
                    self._notify(name, w, True)
                    log.info("model %s: %s worker %x joined at %s", name, w.card.worker_type,
                             iid, w.address)

    def _notify(self, name: str, worker: WorkerEntry, added: bool) -> None:
        for fn in self._listeners:
            try:
                fn(name, worker, added)
            except Exception:
                log.exception("model listener failed")


class ModelManager(WorkerPool):
    """Keeps :attr:`models` (the serving pool: aggregated and decode workers) and
    :attr:`prefill` (prefill workers) in sync with discovery. Start with :meth:`start`, stop
    with :meth:`close`. Listeners run after every change (e.g. routers add workers).
    """

    def __init__(self, discovery: Discovery, *, namespace: str | None = None) -> None:
        super().__init__("serving")
        self._discovery = discovery
        self._namespace = namespace
        #: Prefill workers per model (``worker_type`` ``prefill``), for the prefill router.
        self.prefill = WorkerPool(PREFILL_WORKER_TYPE)
        self._cards: dict[str, ModelCard] = {}  # suffix key -> card
        self._instances: dict[str, InstanceInfo] = {}
        self._tasks = TaskSet()
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        self._synced_parts: set[str] = set()

    async def start(self) -> None:
        for prefix in (MODELS_PREFIX, INSTANCES_PREFIX):
            full = prefix + (f"{self._namespace}/" if self._namespace else "")
            self._tasks.spawn(self._watch(full, prefix), name=f"watch {full}")

    async def close(self) -> None:
        await self._tasks.cancel_all()

    async def wait_for_model(self, name: str, *, workers: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``name`` is served by at least ``workers`` workers (tests, start-up)."""

        def ok() -> bool:
            entry = self.models.get(name)
            return entry is not None and len(entry.workers) >= workers

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(ok), timeout)

    async def wait_for(self, predicate: Callable[[], bool], *, timeout: float = 30.0) -> None:
        """Wait until ``predicate()`` (checked after every change) is true."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def _watch(self, prefix: str, kind: str) -> None:
        while True:
            try:
                async for event in self._discovery.watch_prefix(prefix):
                    await self._apply(kind, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("discovery watch on %s failed; restarting", prefix)
                await asyncio.sleep(1.0)

    async def _apply(self, kind: str, event: DiscoveryEvent) -> None:
        suffix = event.key[len(kind):]
        if kind == MODELS_PREFIX:
            changed = _update(self._cards, ModelCard, suffix, event, "model card")
        else:
            changed = _update(self._instances, InstanceInfo, suffix, event, "instance")
        if not changed:
            return
        self._rebuild()
        async with self._changed:
            self._changed.notify_all()

    def _rebuild(self) -> None:
        pools: dict[bool, tuple[dict[str, dict[int, WorkerEntry]], dict[str, ModelCard]]] = {
            False: ({}, {}), True: ({}, {})}
        for suffix, card in self._cards.items():
            info = self._instances.get(suffix)
            if info is None:
                continue
            wanted, cards = pools[card.worker_type.lower() == PREFILL_WORKER_TYPE]
            wanted.setdefault(card.display_name, {})[card.instance_id] = WorkerEntry(
                card.instance_id, card, info
            )
            cards.setdefault(card.display_name, card)
        self._sync(*pools[False])
        self.prefill._sync(*pools[True])


def _update(table: dict[str, T], kind: type[T], suffix: str, event: DiscoveryEvent,
            what: str) -> bool:
    """Apply one discovery event to ``table``; False (and a warning) for a malformed value."""
    if event.kind == "put" and event.value is not None:
        try:
            table[suffix] = from_json(event.value, kind)
        except ProtocolError as exc:
            log.warning("ignoring malformed %s %s: %s", what, event.key, exc)
            return False
    else:
        table.pop(suffix, None)
    return True
