"""Tracks which models are served by which workers, from discovery.

Watches ``v1/mdc/`` (model cards) and ``v1/instances/`` (request-plane addresses). A model is
listed while at least one worker with both a card and an instance entry serves it; it disappears
when its last worker leaves. The tokenizer/preprocessor of a model is loaded once, from the first
card's ``source_path``.
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


class ModelManager:
    """Keeps :attr:`models` in sync with discovery. Start with :meth:`start`, stop with
    :meth:`close`. ``on_change`` callbacks run after every change (e.g. routers add workers).
    """

    def __init__(self, discovery: Discovery, *, namespace: str | None = None) -> None:
        self._discovery = discovery
        self._namespace = namespace
        self.models: dict[str, ModelEntry] = {}
        self._cards: dict[str, ModelCard] = {}  # suffix key -> card
        self._instances: dict[str, InstanceInfo] = {}
        self._tasks = TaskSet()
        self._listeners: list[Callable[[str, WorkerEntry, bool], None]] = []
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        self._synced_parts: set[str] = set()

    def add_listener(self, fn: Callable[[str, WorkerEntry, bool], None]) -> None:
        """``fn(model_name, worker, added)`` on every worker joining or leaving a model."""
        self._listeners.append(fn)

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
        wanted: dict[str, dict[int, WorkerEntry]] = {}
        cards: dict[str, ModelCard] = {}
        for suffix, card in self._cards.items():
            info = self._instances.get(suffix)
            if info is None:
                continue
            wanted.setdefault(card.display_name, {})[card.instance_id] = WorkerEntry(
                card.instance_id, card, info
            )
            cards.setdefault(card.display_name, card)
        # Diff against the current view so listeners see precise joins and leaves.
        for name, entry in list(self.models.items()):
            now = wanted.get(name, {})
            for iid, w in list(entry.workers.items()):
                if iid not in now:
                    del entry.workers[iid]
                    self._notify(name, w, False)
            if not now:
                del self.models[name]
                log.info("model %s removed (no workers left)", name)
        for name, workers in wanted.items():
            current = self.models.get(name)
            if current is None:
                current = self.models[name] = ModelEntry(name, cards[name], {}, int(time.time()))
                log.info("model %s added", name)
            for iid, w in workers.items():
                if iid not in current.workers:
                    current.workers[iid] = w
                    self._notify(name, w, True)
                    log.info("model %s: worker %x joined at %s", name, iid, w.address)

    def _notify(self, name: str, worker: WorkerEntry, added: bool) -> None:
        for fn in self._listeners:
            try:
                fn(name, worker, added)
            except Exception:
                log.exception("model listener failed")


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
