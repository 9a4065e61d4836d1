"""Our event plane against the REAL NVIDIA Dynamo 1.6.1 (``python -m dynamo.mocker`` and
``python -m dynamo.frontend --router-mode kv``), sharing one file-discovery root and the ZMQ
event plane.

- Our ``ZmqEventPlane`` (on our ``FileDiscovery``) follows a Dynamo mocker's channels and
  decodes its ``kv-events`` and ``kv_metrics`` into our types; the hashes chain as ours do, and
  our KV index built from them matches the mocker's cached prompt.
- Dynamo's frontend decodes and acts on the load we publish: ActiveLoad with our extra
  ``kv_total_blocks`` (plus an unknown field) drives its busy detection (529 when over the
  threshold, 200 below), and it logs no decode error for it (a malformed control message of
  ours does get logged, so the check can fail).

Skipped without a Dynamo install (``$DYN_TEST_DYNAMO_PYTHON``, else ``/work/dynamo/venv``);
failing instead under ``DYN_TEST_REQUIRE_DYNAMO=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest
from dynamo_real import Deployment, deployment, wait_for_model

from dynamo_backend_common.kv.hashing import sequence_hash
from dynamo_backend_common.protocols.kv import (
    KvStored,
    LoadSnapshot,
    RouterEvent,
    decode_kv_events,
    decode_load,
    encode_load,
)
from dynamo_backend_common.router import KvIndexer
from dynamo_backend_common.runtime.discovery import Discovery, open_discovery
from dynamo_backend_common.runtime.events import (
    EVENT_CHANNELS_PREFIX,
    EVENT_SOURCES_PREFIX,
    Subscription,
    ZmqEventPlane,
    kv_events_subject,
    kv_metrics_subject,
)

pytestmark = pytest.mark.integration
_ = deployment  # the fixture, used by name below

MODEL = "tiny-mock"
TIMEOUT = 30.0
LONG = " ".join(f"word{i} alpha beta gamma" for i in range(60))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def mocker(d: Deployment, *extra: str) -> None:
    """A Dynamo mocker as the brief runs it (speedup 1000, block size 16)."""
    d.dynamo_mocker(MODEL, *extra, speedup=1000)


async def mocker_instance(disc: Discovery) -> int:
    """The instance id of the one Dynamo worker serving ``generate``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        keys = [k for k in await disc.get_prefix("v1/instances/dynamo/backend/generate/")]
        if keys:
            (key,) = keys
            return int(key.rsplit("/", 1)[1], 16)
        assert time.monotonic() < deadline, "no Dynamo instance record"
        await asyncio.sleep(0.1)


async def mocker_channels(disc: Discovery) -> None:
    """Until the mocker's kv-events and kv_metrics channels and its event source are in
    discovery (it writes them a little after its instance and card; under load, visibly
    later)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        channels = await disc.get_prefix(EVENT_CHANNELS_PREFIX)
        if (any("/topic/kv-events/" in k for k in channels)
                and any("/topic/kv_metrics/" in k for k in channels)
                and await disc.get_prefix(EVENT_SOURCES_PREFIX)):
            return
        assert time.monotonic() < deadline, "no Dynamo kv-events channel or source record"
        await asyncio.sleep(0.1)


async def chat(http: httpx.AsyncClient, url: str, text: str, max_tokens: int = 4) -> httpx.Response:
    return await http.post(url + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}]})


async def collect(sub: Subscription, decode: Callable[[bytes], Any], until: Callable[[], bool],
                  out: list[Any]) -> None:
    """Decode messages of ``sub`` into ``out`` until ``until()`` (bounded by TIMEOUT)."""
    async with asyncio.timeout(TIMEOUT):
        while not until():
            out.append(decode((await anext(sub)).payload))


async def test_our_plane_follows_a_dynamo_mocker(deployment: Deployment) -> None:
    mocker(deployment)
    _fe, url = deployment.dynamo_frontend(router_mode="kv")
    wait_for_model(url, MODEL)
    async with (
        open_discovery(f"file://{deployment.kv}") as disc,
        httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as http,
    ):
        worker_id = await mocker_instance(disc)
        await mocker_channels(disc)
        plane = ZmqEventPlane(disc)
        await plane.start()
        try:
            kv = plane.subscribe(kv_events_subject("dynamo", "backend"))
            load = plane.subscribe(kv_metrics_subject("dynamo", "backend"))
            await kv.ready()
            await load.ready()
            assert plane._by_publisher, "no Dynamo channel found in the file discovery"
            # Dynamo's EventSource attributes the kv-events publisher to the worker.
            (source,) = (await disc.get_prefix(EVENT_SOURCES_PREFIX)).values()
            meta = msgspec.json.decode(source)["metadata"]
            assert meta["worker"] == {"worker_id": worker_id, "dp_rank": 0}
            assert meta["publisher_id"] in plane._by_publisher

            batches: list[tuple[list[RouterEvent], int]] = []
            loads: list[LoadSnapshot] = []
            stored = lambda: sum(  # noqa: E731
                isinstance(e.event.data, KvStored) for b, _ in batches for e in b)
            # A SUB that connected moments ago may miss a publisher's first messages (ZMQ's
            # slow joiner), and the mocker publishes load only when it changes: keep sending
            # new prompts until both streams have delivered.
            sent = 0
            async with asyncio.timeout(TIMEOUT):
                while stored() < 3 or not loads:
                    r = await chat(http, url, f"trial {sent} {LONG}")
                    sent += 1
                    assert r.status_code == 200, r.text
                    for sub, decode, out in ((kv, decode_kv_events, batches),
                                             (load, decode_load, loads)):
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.5):
                                out.append(decode((await anext(sub)).payload))
        finally:
            await plane.close()

    events = [e for b, unknown in batches for e in b if unknown == 0]
    assert all(unknown == 0 for _, unknown in batches)
    assert {e.worker_id for e in events} == {worker_id}
    assert all(e.storage_tier == "device" and e.event.dp_rank == 0 for e in events)
    ids = [e.event.event_id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    index = KvIndexer()
    chains: dict[int, list[int]] = {}  # block hash -> the chain of hashes ending with it
    longest: list[int] = []
    for e in events:
        index.apply(e)
        data = e.event.data
        if not isinstance(data, KvStored):
            continue
        # Dynamo's chained hashes are ours: block_hash = H(parent block_hash, tokens_hash).
        prev = data.parent_hash
        chain = [] if prev is None else list(chains.get(prev, []))
        for b in data.blocks:
            assert b.tokens_hash is not None
            assert b.block_hash == sequence_hash(prev, b.tokens_hash)
            prev = b.block_hash
            chain.append(b.block_hash)
            chains[b.block_hash] = list(chain)
        if len(chain) > len(longest):
            longest = chain
    assert len(longest) >= 8  # a long prompt: many full 16-token blocks
    assert index.find_matches(longest) == {(worker_id, 0): len(longest)}
    # The mocker's load: Dynamo's ActiveLoad, no total (the card has it).
    assert {ld.worker_id for ld in loads} == {worker_id}
    assert all(ld.kv_total_blocks is None and ld.kv_used_blocks is not None for ld in loads)
    assert (plane.malformed, plane.bad_records) == (0, 0)


async def test_dynamo_frontend_acts_on_our_kv_metrics(deployment: Deployment) -> None:
    mocker(deployment)
    fe, url = deployment.dynamo_frontend("--active-decode-blocks-threshold", "0.5",
                                         router_mode="kv")
    wait_for_model(url, MODEL)
    async with (
        open_discovery(f"file://{deployment.kv}") as disc,
        httpx.AsyncClient(timeout=TIMEOUT, trust_env=False) as http,
    ):
        plane = ZmqEventPlane(disc, endpoint="generate")
        await plane.start()
        try:
            worker_id = await mocker_instance(disc)
            subject = kv_metrics_subject("dynamo", "backend")
            plane.prepare_publish(subject)
            await plane.flush()
            (pid, _address) = plane.publishers[subject]
            assert (await chat(http, url, "hello")).status_code == 200

            async def status_after(used: int, total: int | None) -> int:
                """Publish our load until the frontend's answer reflects it (it connects to our
                channel a moment after the record appears); the last status seen."""
                deadline = time.monotonic() + TIMEOUT
                want = 529 if used > 8192 else 200
                while True:
                    payload = encode_load(LoadSnapshot(worker_id=worker_id, kv_used_blocks=used,
                                                       kv_total_blocks=total))
                    if total is not None:  # and a field Dynamo has never heard of
                        payload = msgspec.msgpack.encode(
                            {**msgspec.msgpack.decode(payload), "gpu_cache_usage": 0.9})
                    plane.publish(subject, payload)
                    await asyncio.sleep(0.2)
                    status = (await chat(http, url, f"probe {used}", max_tokens=1)).status_code
                    if status == want or time.monotonic() > deadline:
                        return status

            # 16000 of the card's 16384 blocks in use: over the 0.5 threshold, Dynamo refuses.
            assert await status_after(16000, 16384) == 529
            assert await status_after(0, 16384) == 200
            assert await status_after(16000, None) == 529  # without our extension field too
            assert await status_after(0, None) == 200
            lines = [_ANSI.sub("", line) for line in fe.lines]
            assert not [ln for ln in lines if f"publisher_id={pid}" in ln and "reject" in ln]
            assert not [ln for ln in lines if "KV metrics payload decode failed" in ln]

            # The control: a malformed load of ours is reported by the same frontend.
            plane.publish(subject, b"\xc1\xc1")
            fe.wait_line(lambda ln: "KV metrics payload decode failed" in _ANSI.sub("", ln), 10)
        finally:
            await plane.close()
