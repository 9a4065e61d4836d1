"""The frontend's Prometheus metrics (``GET /metrics``), named ``dynamo_frontend_*``.

Families (labels in braces):

- ``dynamo_frontend_requests_total{model,endpoint,request_type,status}``: finished HTTP
  requests; ``endpoint`` is ``chat_completions`` | ``completions``, ``request_type``
  ``stream`` | ``unary``, ``status`` ``success`` | ``error`` | ``cancelled`` (the client left).
  Requests refused before a model was resolved (bad JSON, unknown model) count under
  ``model=""`` so client-chosen names never become label values.
- ``dynamo_frontend_inflight_requests{model}``: gauge.
- ``dynamo_frontend_input_tokens_total{model}``, ``dynamo_frontend_output_tokens_total{model}``.
- ``dynamo_frontend_time_to_first_token_seconds{model}``: from request arrival to the first
  token-bearing chunk; ``dynamo_frontend_inter_token_latency_seconds{model}``: per token, the gap
  between token-bearing chunks divided by the chunk's tokens (one observation per chunk);
  ``dynamo_frontend_request_duration_seconds{model}``: histograms.
- ``dynamo_frontend_model_workers{model}``: workers serving each model (from discovery).
- ``dynamo_frontend_migrations_total``: streams moved to another worker mid-stream.
- the router's ``dynamo_frontend_router_*`` families (they share this registry).

Like :mod:`..worker.metrics`, state is plain numbers folded into metric families at
scrape time (no per-call ``prometheus_client`` locks); everything runs on the event loop thread.

Several frontend processes (``dynamo-backend frontend --processes N``): each process serves its
raw metric state (:func:`encode_state`: every family of its registry, samples and all) on a
unix socket in a directory the processes share (:class:`MetricsPeers`). The process that
answers ``GET /metrics`` (:meth:`FrontendMetrics.scrape`) reads its siblings' states (each with
a short timeout) and renders the merge (:func:`merge_states`): counters and histograms summed
over the processes (each request is counted by the one process that served it, so nothing is
counted twice), the gauges of :data:`SUMMED_GAUGES` (requests in flight) summed, every other
gauge (``model_workers``, the router's index size: the same shared state seen by each process)
taken from the answering process, with label sets only siblings have (per-process ``pid``
series) added. ``dynamo_frontend_processes{status="up"}`` counts the processes merged,
``{status="down"}`` the siblings whose socket is there but did not answer (killed: a process
that stops cleanly removes its socket). ``dynamo_frontend_process_requests_total{pid}`` counts
each process's finished requests (how the kernel spread the connections). A sibling that died
takes its counts with it (Prometheus sees a counter reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..runtime.metrics import (
    DURATION_BUCKETS,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    FastHistogram,
)

__all__ = [
    "SUMMED_GAUGES",
    "FrontendMetrics",
    "MetricsPeers",
    "ModelStats",
    "RequestTimer",
    "encode_state",
    "merge_states",
    "render_families",
]

log = logging.getLogger("dynamo_backend_common.frontend")

PREFIX = "dynamo_frontend_"
#: Gauges summed over frontend processes (each process counts its own share); every other
#: gauge describes state the processes share and is taken once (see the module doc).
SUMMED_GAUGES: Final = frozenset({PREFIX + "inflight_requests"})


@dataclass(slots=True)
class ModelStats:
    """Per-model state."""

    inflight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: FastHistogram = field(default_factory=lambda: FastHistogram(TTFT_BUCKETS))
    itl: FastHistogram = field(default_factory=lambda: FastHistogram(ITL_BUCKETS))
    duration: FastHistogram = field(default_factory=lambda: FastHistogram(DURATION_BUCKETS))


class RequestTimer:
    """Per-request timing: call :meth:`tokens` for every token-bearing chunk, :meth:`done` once.

    Cheap enough to call per chunk: two float subtractions and one histogram bucket lookup.
    """

    __slots__ = ("_last", "_metrics", "_start", "_stats", "_tokens", "done_called", "first")

    def __init__(self, metrics: FrontendMetrics, stats: ModelStats, start: float) -> None:
        self._metrics = metrics
        self._stats = stats
        self._start = start
        self._last = 0.0
        self._tokens = 0
        #: Seconds to the first token, once seen.
        self.first: float | None = None
        self.done_called = False

    def tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = now - self._start
            self._stats.ttft.observe(self.first)
        else:
            self._stats.itl.observe((now - self._last) / n)
        self._last = now
        self._tokens += n


class FrontendMetrics:
    """Owns the frontend registry (pass :attr:`registry` to the Router too)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(
            auto_describe=True)
        self._models: dict[str, ModelStats] = {}
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._worker_counts: Callable[[], dict[str, int]] = dict
        self._migrations: Callable[[], int] = lambda: 0
        #: Sibling processes whose metrics a scrape merges (``None``: this process alone).
        self.peers: MetricsPeers | None = None
        self._pid = str(os.getpid())
        self.registry.register(_Collector(self))

    def bind(self, worker_counts: Callable[[], dict[str, int]],
             migrations: Callable[[], int]) -> None:
        """Where the scrape reads the per-model worker counts and the migration count."""
        self._worker_counts = worker_counts
        self._migrations = migrations

    def stats(self, model: str) -> ModelStats:
        s = self._models.get(model)
        if s is None:
            s = self._models[model] = ModelStats()
        return s

    def request_started(self, model: str, input_tokens: int, start: float) -> RequestTimer:
        s = self.stats(model)
        s.inflight += 1
        s.input_tokens += input_tokens
        return RequestTimer(self, s, start)

    def request_finished(self, timer: RequestTimer, model: str, endpoint: str, stream: bool,
                         status: str, output_tokens: int, now: float) -> None:
        if timer.done_called:
            return
        timer.done_called = True
        s = timer._stats
        s.inflight -= 1
        s.output_tokens += output_tokens
        s.duration.observe(now - timer._start)
        self.count(model, endpoint, stream, status)

    def count(self, model: str, endpoint: str, stream: bool, status: str) -> None:
        """Count a finished request (also those refused before generation)."""
        key = (model, endpoint, "stream" if stream else "unary", status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def render(self) -> bytes:
        """This process's metrics, Prometheus text."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """What ``GET /metrics`` answers: :meth:`render`, or with :attr:`peers` set the merge
        of this process's metrics and its siblings' (see the module doc)."""
        if self.peers is None:
            return self.render()
        return await self.peers.render()

    def _collect(self) -> Iterator[Metric]:
        req = CounterMetricFamily(PREFIX + "requests", "Finished HTTP requests.",
                                  labels=["model", "endpoint", "request_type", "status"])
        for key, n in sorted(self._requests.items()):
            req.add_metric(list(key), n)
        yield req
        models = sorted(self._models.items())
        inflight = GaugeMetricFamily(PREFIX + "inflight_requests", "Requests in progress.",
                                     labels=["model"])
        in_tok = CounterMetricFamily(PREFIX + "input_tokens", "Prompt tokens of requests sent "
                                     "to workers.", labels=["model"])
        out_tok = CounterMetricFamily(PREFIX + "output_tokens", "Tokens generated for finished "
                                      "requests.", labels=["model"])
        for name, s in models:
            inflight.add_metric([name], s.inflight)
            in_tok.add_metric([name], s.input_tokens)
            out_tok.add_metric([name], s.output_tokens)
        yield inflight
        yield in_tok
        yield out_tok
        for attr, doc in (
            ("ttft", ("time_to_first_token_seconds",
                      "Time from request arrival to the first token.")),
            ("itl", ("inter_token_latency_seconds",
                     "Gap between token-bearing chunks, per token.")),
            ("duration", ("request_duration_seconds", "Time from arrival to the end.")),
        ):
            fam = HistogramMetricFamily(PREFIX + doc[0], doc[1], labels=["model"])
            for name, s in models:
                buckets, total = getattr(s, attr).cumulative()
                fam.add_metric([name], buckets, total)
            yield fam
        workers = GaugeMetricFamily(PREFIX + "model_workers", "Workers serving each model.",
                                    labels=["model"])
        for name, n in sorted(self._worker_counts().items()):
            workers.add_metric([name], n)
        yield workers
        yield CounterMetricFamily(PREFIX + "migrations", "Streams moved to another worker "
                                  "after a mid-stream failure.", value=self._migrations())
        if self.peers is not None:
            mine = CounterMetricFamily(PREFIX + "process_requests", "Finished HTTP requests "
                                       "per frontend process.", labels=["pid"])
            mine.add_metric([self._pid], sum(self._requests.values()))
            yield mine


class _Collector:
    def __init__(self, owner: FrontendMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        return self._owner._collect()


# ---------------------------------------------------------------------------- several processes

#: One family: (name, type, documentation, unit, [(sample name, labels, value), ...]).
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]
_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(list[Family])
#: Family types whose samples add up over processes.
_SUMMED_TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


def collect_families(registry: CollectorRegistry) -> list[Family]:
    """Every family ``registry`` collects, as plain data (exemplars and timestamps dropped)."""
    return [(m.name, m.type, m.documentation, m.unit,
             [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
            for m in registry.collect()]


def encode_state(registry: CollectorRegistry) -> bytes:
    """``registry``'s raw state (msgpack of :func:`collect_families`), for a sibling to merge."""
    return _state_encoder.encode(collect_families(registry))


def decode_state(data: bytes) -> list[Family]:
    """Inverse of :func:`encode_state`; raises ``msgspec`` errors for anything else."""
    return _state_decoder.decode(data)


def merge_states(local: list[Family], others: Iterable[list[Family]]) -> list[Family]:
    """Merge the answering process's families (``local``) with its siblings' (see the module
    doc): counter, histogram and summary samples summed by (sample name, labels), ``_created``
    taking the earliest; gauges of :data:`SUMMED_GAUGES` summed; any other family's samples
    taken from ``local``, siblings adding only label sets ``local`` lacks. Families keep
    ``local``'s order (siblings' extra families after it); the inputs are not modified."""
    order: list[str] = []
    meta: dict[str, tuple[str, str, str]] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    labels_of: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}
    for families in (local, *others):
        for name, typ, doc, unit, fam_samples in families:
            table = samples.get(name)
            if table is None:
                order.append(name)
                meta[name] = (typ, doc, unit)
                table = samples[name] = {}
            kind = meta[name][0]
            summed = kind in _SUMMED_TYPES or (kind == "gauge" and name in SUMMED_GAUGES)
            for sname, labels, value in fam_samples:
                key = (sname, tuple(sorted(labels.items())))
                old = table.get(key)
                if old is None:
                    table[key] = value
                    labels_of[key] = labels
                elif summed:
                    table[key] = min(old, value) if sname.endswith("_created") else old + value
                # else: taken once, the first seen (the answering process's) stays
    return [(name, meta[name][0], meta[name][1], meta[name][2],
             [(k[0], labels_of[k], v) for k, v in samples[name].items()]) for name in order]


def render_families(families: Iterable[Family]) -> bytes:
    """Prometheus text of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families)))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, typ, doc, unit, fam_samples in self._families:
            metric = Metric(name, doc, typ, unit)
            for sname, labels, value in fam_samples:
                metric.add_sample(sname, labels, value)
            yield metric


class MetricsPeers:
    """The metric states of sibling frontend processes, over unix sockets in ``directory``.

    :meth:`start` listens on ``directory/NAME.sock``: a client that connects gets this
    process's :func:`encode_state` and EOF. :meth:`render` connects to every other ``*.sock``
    there at once (each answer within ``timeout`` s, else that sibling is skipped and counted
    down), merges (:func:`merge_states`) and renders. :meth:`close` stops listening and
    removes the socket, so a process that stops cleanly is no longer expected; a killed one
    leaves its socket behind and counts as down. The directory is the caller's (the
    supervisor creates and removes it).
    """

    def __init__(self, metrics: FrontendMetrics, directory: str | os.PathLike[str], name: str,
                 *, timeout: float = 1.0) -> None:
        self.metrics = metrics
        self.directory = Path(directory)
        self.path = self.directory / f"{name}.sock"
        self.timeout = timeout
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (replacing a stale socket of the same name) and attach to ``metrics``."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        self.metrics.peers = self

    async def close(self) -> None:
        if self.metrics.peers is self:
            self.metrics.peers = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(encode_state(self.metrics.registry))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    def siblings(self) -> list[Path]:
        """The other processes' sockets in the directory now."""
        try:
            return sorted(p for p in self.directory.glob("*.sock") if p != self.path)
        except OSError:
            return []

    async def _fetch(self, path: Path) -> list[Family] | None:
        """A sibling's families; ``None`` if it did not answer in time; raises
        ``FileNotFoundError`` when its socket went away (it stopped cleanly meanwhile)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(path))
                data = await reader.read()
            return decode_state(data)
        except FileNotFoundError:
            raise
        except (OSError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError,
                ValueError) as exc:
            log.debug("metrics of sibling %s unavailable: %s", path.name, exc)
            return None
        finally:
            if writer is not None:
                writer.close()

    async def gather(self) -> tuple[list[list[Family]], int]:
        """The siblings' families that came, and how many siblings did not answer."""
        results = await asyncio.gather(*(self._fetch(p) for p in self.siblings()),
                                       return_exceptions=True)
        states: list[list[Family]] = []
        down = 0
        for r in results:
            if isinstance(r, FileNotFoundError):
                continue
            if isinstance(r, BaseException) or r is None:
                down += 1
            else:
                states.append(r)
        return states, down

    async def render(self) -> bytes:
        """The merged metrics of this process and its siblings, Prometheus text."""
        states, down = await self.gather()
        merged = merge_states(collect_families(self.metrics.registry), states)
        merged.append((PREFIX + "processes", "gauge", "Frontend processes whose metrics this "
                       "scrape merged (up) or that did not answer (down).", "",
                       [(PREFIX + "processes", {"status": "up"}, float(1 + len(states))),
                        (PREFIX + "processes", {"status": "down"}, float(down))]))
        return render_families(merged)

