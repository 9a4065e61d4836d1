"""etcd v3 discovery (``etcd://host:port[,host:port]``, also ``http(s)://``).

Talks to etcd's JSON gRPC gateway (``/v3/...``, served on the client port since etcd 3.4;
3.3 spelled it ``/v3beta/``) over httpx. Why not a gRPC client: ``etcd3`` / ``aetcd`` pin old
protobuf/grpcio builds and are barely maintained, while httpx is already a dependency, is
actively maintained, fully async, and the gateway is a stable, documented part of etcd. The
gateway carries everything needed here: leases, KV, and streaming watches (newline-delimited
JSON). Keys and values travel base64-encoded; 64-bit integers travel as JSON strings.

Semantics:

- ``start()`` grants one lease (``instance_id`` is its id) with TTL ``ceil(ttl)`` (etcd may
  grant more; the granted TTL is used). A dedicated thread renews it every TTL/3 with its own
  synchronous client, so a blocked event loop (say, a synchronous model load) does not lose
  it; that is also why Dynamo keeps its keep-alive on a dedicated thread. If no renewal
  succeeds for a whole TTL, or etcd reports the lease gone, ``lease_lost`` is set.
- Keys and values are stored as given: our keys already are Dynamo's full etcd keys
  (``bucket/key``, e.g. ``v1/instances/dynamo/backend/generate/{id:x}``) and values its raw
  JSON. The lease TTL defaults to 10 s as in Dynamo; ``$DYN_DISCOVERY_TTL``, then Dynamo's
  ``$ETCD_LEASE_TTL``, override it (an explicit ``ttl`` beats both).
- ``put`` is create-or-update bound to the lease. The first ``put`` of a key by this object
  is Dynamo's create: a transaction ``if version(key) == 0 then put(key, value, lease)``. If
  the key exists already (another process's, or this one's before a restart) it is then
  overwritten with a plain put, which keeps our create-or-update contract (Dynamo's create
  would report "exists" instead). Later puts of an owned key are plain puts (Dynamo's update).
  ``close()`` revokes the lease, which deletes every key still attached to it in one etcd
  transaction (watchers see the deletes).
- ``watch_prefix`` reads the prefix (getting revision R), yields it, then streams from R + 1, so
  nothing between snapshot and stream is lost. If the stream breaks it reconnects from the
  last revision seen; if that revision was compacted meanwhile, it re-reads the prefix and
  yields the difference to what it had reported. Either way the consumer sees a consistent
  sequence. A failure of the first read is raised to the consumer; later ones are retried.
- Several endpoints are tried in turn on connection errors.
- ``HTTP(S)_PROXY`` and friends are ignored (``trust_env=False``): etcd is cluster-internal,
  and a proxy meant for package downloads must not capture it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import httpx

from ..tasks import cancel_and_wait
from ._keepalive import KeepAlive
from .base import Discovery, DiscoveryError, DiscoveryEvent, resolve_ttl

__all__ = ["EtcdDiscovery"]

log = logging.getLogger(__name__)

_LEASE_NOT_FOUND = 5  # gRPC NOT_FOUND, as etcd reports an unknown/expired lease
_MAX_BACKOFF = 2.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` covering every key that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # with key "\0": the whole keyspace
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _range_of(prefix: str) -> dict[str, str]:
    raw = prefix.encode()
    key = raw if raw else b"\0"
    return {"key": _b64(key), "range_end": _b64(_prefix_end(raw))}


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)
    return str(body)


class EtcdDiscovery(Discovery):
    """:class:`Discovery` on etcd v3 through its JSON gateway.

    ``endpoints`` are base URLs such as ``"http://127.0.0.1:2379"``; ``timeout`` bounds every
    unary request (watch streams have no read timeout).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ttl: float | None = None,
        timeout: float = 5.0,
    ) -> None:
        if ttl is None and not os.environ.get("DYN_DISCOVERY_TTL", "").strip():
            raw = os.environ.get("ETCD_LEASE_TTL", "").strip()
            if raw:
                try:
                    ttl = resolve_ttl(float(raw))
                except ValueError:
                    raise ValueError(
                        f"ETCD_LEASE_TTL must be a positive number, got {raw!r}"
                    ) from None
        super().__init__(ttl=ttl)
        if not endpoints:
            raise ValueError("EtcdDiscovery needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0  # index of the endpoint that last worked
        self._client: httpx.AsyncClient | None = None
        self._granted_ttl = 0
        self._keepalive: KeepAlive | None = None
        self._watch_tasks: set[asyncio.Task[None]] = set()
        self._watch_queues: set[asyncio.Queue[DiscoveryEvent | None]] = set()
        self._owned: set[str] = set()  # keys this object has put (created or overwritten)

    # -- transport ----------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        return self._client

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path``, failing over across endpoints on connection errors."""
        client = self._http()
        last: Exception | None = None
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            try:
                response = await client.post(self.endpoints[index] + path, json=body)
            except httpx.TransportError as exc:
                last = exc
                continue
            self._current = index
            try:
                data = response.json()
            except ValueError:
                data = response.text
            if response.status_code != 200 or not isinstance(data, dict) or "error" in data:
                if isinstance(data, dict) and data.get("code") == _LEASE_NOT_FOUND:
                    if path != "/v3/lease/revoke":
                        self.lease_lost.set()
                raise DiscoveryError(
                    f"etcd {path} failed (HTTP {response.status_code}): {_error_text(data)}"
                )
            return data
        raise DiscoveryError(f"etcd unreachable at {', '.join(self.endpoints)}: {last}")

    # -- lease --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_open()
        if self._started:
            return
        ttl = max(1, math.ceil(self.ttl))
        granted = await self._call("/v3/lease/grant", {"TTL": ttl})
        lease_id = int(granted.get("ID", 0))
        if lease_id <= 0:
            raise DiscoveryError(f"etcd granted no lease: {granted}")
        self._granted_ttl = int(granted.get("TTL", ttl))
        self._instance_id = lease_id
        self._started = True
        self._keepalive = _EtcdRenewer(self, lease_id, self._granted_ttl).start()

    # -- KV -----------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes) -> None:
        self._check_started()
        put = {"key": _b64(key.encode()), "value": _b64(value), "lease": str(self.instance_id)}
        if key not in self._owned:
            # Dynamo's create: put only if the key does not exist (version 0).
            txn = {
                "compare": [
                    {"key": put["key"], "target": "VERSION", "result": "EQUAL", "version": "0"}
                ],
                "success": [{"request_put": put}],
            }
            created = (await self._call("/v3/kv/txn", txn)).get("succeeded", False)
            if created:
                self._owned.add(key)
                return
            log.debug("etcd key %r exists already: overwriting it (put is create-or-update)", key)
        await self._call("/v3/kv/put", put)
        self._owned.add(key)

    async def delete(self, key: str) -> None:
        self._check_open()
        self._owned.discard(key)
        await self._call("/v3/kv/deleterange", {"key": _b64(key.encode())})

    async def _range(self, prefix: str) -> tuple[dict[str, bytes], int]:
        data = await self._call("/v3/kv/range", _range_of(prefix))
        entries = {
            _unb64(kv["key"]).decode(errors="replace"): _unb64(kv.get("value"))
            for kv in data.get("kvs", ())
        }
        return entries, int(data["header"]["revision"])

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        return (await self._range(prefix))[0]

    # -- watch --------------------------------------------------------------------------------
    async def watch_prefix(self, prefix: str) -> AsyncGenerator[DiscoveryEvent, None]:
        if self._closed:
            return
        snapshot, revision = await self._range(prefix)
        if self._closing.is_set():
            return
        queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
        for key in sorted(snapshot):
            queue.put_nowait(DiscoveryEvent("put", key, snapshot[key]))
        task = asyncio.get_running_loop().create_task(
            self._watch_reader(prefix, revision + 1, dict(snapshot), queue),
            name=f"etcd watch {prefix!r}",
        )
        # close() cancels these and wakes the queues; the finally below covers aclose().
        self._watch_tasks.add(task)
        self._watch_queues.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watch_queues.discard(queue)
            self._watch_tasks.discard(task)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_reader(
        self,
        prefix: str,
        start_revision: int,
        known: dict[str, bytes],
        queue: asyncio.Queue[DiscoveryEvent | None],
    ) -> None:
        """Feed ``queue`` from a watch stream; reconnect and resync until cancelled.

        ``known`` mirrors what the consumer has been told, so a resync can send the diff.
        """
        next_revision = start_revision
        backoff = 0.1
        while not self._closing.is_set():
            resync = False
            index = self._current
            request = {"create_request": {**_range_of(prefix), "start_revision": next_revision}}
            try:
                async with self._http().stream(
                    "POST",
                    self.endpoints[index] + "/v3/watch",
                    json=request,
                    timeout=httpx.Timeout(self.timeout, read=None),
                ) as response:
                    if response.status_code != 200:
                        raise DiscoveryError(f"etcd watch failed: HTTP {response.status_code}")
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        message = json.loads(line)
                        if "error" in message:
                            raise DiscoveryError(f"etcd watch: {_error_text(message)}")
                        result = message.get("result", {})
                        if int(result.get("compact_revision", 0)) > 0:
                            resync = True  # history we need is gone: re-read and diff
                            break
                        if result.get("canceled"):
                            raise DiscoveryError(f"etcd cancelled watch: {result}")
                        backoff = 0.1
                        for event in result.get("events", ()):
                            kv = event["kv"]
                            key = _unb64(kv["key"]).decode(errors="replace")
                            if event.get("type") == "DELETE":
                                known.pop(key, None)
                                queue.put_nowait(DiscoveryEvent("delete", key, None))
                            else:
                                value = _unb64(kv.get("value"))
                                known[key] = value
                                queue.put_nowait(DiscoveryEvent("put", key, value))
                            next_revision = max(next_revision, int(kv["mod_revision"]) + 1)
            except (httpx.HTTPError, DiscoveryError, ValueError, KeyError) as exc:
                log.warning("etcd watch on %r interrupted: %s; reconnecting", prefix, exc)
                self._current = (index + 1) % len(self.endpoints)
            if not resync and not self._closing.is_set():
                # The stream ended or failed: back off before reconnecting.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            if resync:
                try:
                    next_revision = await self._resync(prefix, known, queue)
                except DiscoveryError as exc:
                    log.warning("etcd watch on %r cannot resync: %s", prefix, exc)

    async def _resync(
        self, prefix: str, known: dict[str, bytes], queue: asyncio.Queue[DiscoveryEvent | None]
    ) -> int:
        snapshot, revision = await self._range(prefix)
        for key in sorted(known.keys() - snapshot.keys()):
            queue.put_nowait(DiscoveryEvent("delete", key, None))
        for key in sorted(snapshot):
            if known.get(key) != snapshot[key]:
                queue.put_nowait(DiscoveryEvent("put", key, snapshot[key]))
        known.clear()
        known.update(snapshot)
        return revision + 1

    # -- shutdown -----------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._keepalive is not None:
            await self._keepalive.stop()
        await cancel_and_wait(list(self._watch_tasks))
        for queue in self._watch_queues:
            queue.put_nowait(None)
        try:
            if self._instance_id is not None:
                # Revoking deletes every key still attached to the lease, atomically.
                await self._call("/v3/lease/revoke", {"ID": str(self._instance_id)})
        except DiscoveryError as exc:
            log.warning("etcd lease revoke failed (keys expire with the lease): %s", exc)
        finally:
            if self._client is not None:
                await self._client.aclose()


class _EtcdRenewer:
    """The state of one etcd lease's renewals (run by a :class:`KeepAlive` thread): its own
    HTTP client, the endpoint in use (the next one after a failure) and the renewal deadline."""

    def __init__(self, owner: EtcdDiscovery, lease_id: int, ttl: int) -> None:
        self.owner = owner
        self.lease_id = lease_id
        self.ttl = ttl
        self.interval = ttl / 3
        self.deadline = time.monotonic() + ttl
        self.index = owner._current
        self.client = httpx.Client(trust_env=False)

    def start(self) -> KeepAlive:
        keepalive = KeepAlive(
            f"discovery-etcd-keepalive-{self.lease_id:x}", self.interval, self.beat,
            lease_lost=self.owner.lease_lost, on_exit=self.client.close,
            on_lost=lambda reason: log.error("etcd lease %x lost: %s", self.lease_id, reason))
        keepalive.start()
        return keepalive

    def beat(self) -> float | str:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return f"no successful keep-alive for {self.ttl}s"
        endpoints = self.owner.endpoints
        url = endpoints[self.index] + "/v3/lease/keepalive"
        try:
            response = self.client.post(url, json={"ID": str(self.lease_id)},
                                        timeout=max(0.2, min(self.interval, remaining)))
            result = response.json().get("result", {})
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("etcd keep-alive of lease %x failed: %s", self.lease_id, exc)
            self.index = (self.index + 1) % len(endpoints)
            return min(self.interval, 0.5)
        # An expired or revoked lease answers without a TTL (i.e. TTL 0).
        if response.status_code == 200 and int(result.get("TTL", 0)) > 0:
            self.deadline = time.monotonic() + self.ttl
            return self.interval
        if response.status_code == 200:
            return "etcd reports the lease expired"
        return min(self.interval, 0.5)  # e.g. 503 while etcd elects a leader
