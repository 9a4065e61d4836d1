"""StatusServer over real HTTP on 127.0.0.1: httpx for the routes, raw sockets for the protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_backend_common.runtime.status_server import METRICS_CONTENT_TYPE, StatusServer
from dynamo_backend_common.worker.metrics import WorkerMetrics

TIMEOUT = 5.0


class Health:
    """A readiness flag the test flips; the server awaits ``check``."""

    def __init__(self) -> None:
        self.ready = False
        self.calls = 0

    async def check(self) -> tuple[bool, dict[str, Any]]:
        self.calls += 1
        return self.ready, {"endpoints": {"generate": "ready" if self.ready else "notready"}}


async def echo(body: bytes) -> tuple[int, str, bytes]:
    req = json.loads(body)
    return 200, "application/json", json.dumps({"echo": req, "bytes": len(body)}).encode()


async def boom(body: bytes) -> tuple[int, str, bytes]:
    raise RuntimeError("handler failed")


@pytest.fixture
def metrics() -> WorkerMetrics:
    m = WorkerMetrics(namespace="ns", component="backend", endpoint="generate",
                      worker_id="ab", model="m")
    m.request_started()
    return m


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
async def server(metrics: WorkerMetrics, health: Health) -> AsyncIterator[StatusServer]:
    srv = StatusServer(metrics=metrics.render, health=health.check, max_body_bytes=1024,
                       max_header_bytes=2048)
    srv.add_route("POST", "/engine/control", echo)
    srv.add_route("POST", "/boom", boom)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def client(server: StatusServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}",
                                 timeout=TIMEOUT) as c:
        yield c


# -- raw-socket helpers ---------------------------------------------------------------------
async def connect(server: StatusServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_response(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        n = 0 if head_only else int(headers.get("content-length", "0"))
        body = await reader.readexactly(n)
    return status, headers, body


async def raw_exchange(server: StatusServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(server)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def at_eof(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(TIMEOUT):
        return await reader.read(1) == b""


# -- routes ---------------------------------------------------------------------------------
async def test_metrics_parse(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == METRICS_CONTENT_TYPE
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    sample = fams["dynamo_component_requests"].samples[0]
    assert sample.value == 1
    assert sample.labels["dynamo_endpoint"] == "generate"
    assert "dynamo_component_inter_token_latency_seconds" in fams


async def test_health_flips_from_503_to_200(client: httpx.AsyncClient, health: Health) -> None:
    r = await client.get("/health")
    assert r.status_code == 503
    assert r.json() == {"status": "notready", "endpoints": {"generate": "notready"}}
    health.ready = True
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "endpoints": {"generate": "ready"}}
    health.ready = False
    assert (await client.get("/health")).status_code == 503
    assert health.calls == 3


async def test_health_without_callback_or_with_a_raising_one_is_notready() -> None:
    async def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("probe failed")

    for srv in (StatusServer(), StatusServer(health=broken)):
        await srv.start()
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                r = await c.get(f"http://127.0.0.1:{srv.port}/health")
            assert r.status_code == 503
            assert r.json()["status"] == "notready"
            # No metrics callback: the route does not exist.
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                assert (await c.get(f"http://127.0.0.1:{srv.port}/metrics")).status_code == 404
        finally:
            await srv.close()


async def test_live_and_query_string(client: httpx.AsyncClient) -> None:
    r = await client.get("/live?verbose=1")
    assert r.status_code == 200
    assert r.json() == {"status": "live"}


async def test_not_found_and_method_not_allowed(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404
    assert r.json()["status"] == "error"
    r = await client.post("/metrics", content=b"")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = await client.get("/engine/control")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"


async def test_post_route_with_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/engine/control", json={"control": "start_profile", "body": {}})
    assert r.status_code == 200
    assert r.json()["echo"] == {"control": "start_profile", "body": {}}
    assert r.json()["bytes"] == int(r.request.headers["content-length"])


async def test_raising_handler_is_500_and_connection_survives(client: httpx.AsyncClient) -> None:
    r = await client.post("/boom", content=b"{}")
    assert r.status_code == 500
    assert (await client.get("/live")).status_code == 200


async def test_keep_alive_reuses_one_connection(client: httpx.AsyncClient) -> None:
    def local_addr(r: httpx.Response) -> Any:
        return r.extensions["network_stream"].get_extra_info("client_addr")

    r1 = await client.get("/live")
    r2 = await client.post("/engine/control", json={"control": "x"})
    assert r1.status_code == r2.status_code == 200
    assert "connection" not in r1.headers  # HTTP/1.1 default: persistent
    assert local_addr(r1) == local_addr(r2)


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    # Far beyond the socket buffers: the server must answer and drain, not reset the client.
    r = await client.post("/engine/control", content=b"x" * (4 << 20))
    assert r.status_code == 413
    assert r.headers["connection"] == "close"
    # The client's pool reconnects for the next request.
    assert (await client.get("/live")).status_code == 200


async def test_oversized_body_with_expect_continue_is_refused_before_upload(
    server: StatusServer,
) -> None:
    status, headers, _ = await raw_exchange(
        server,
        b"POST /engine/control HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    assert status == 413  # not "100 Continue": the client never has to send the body
    assert headers["connection"] == "close"


async def test_expect_continue_gets_100_then_the_response(server: StatusServer) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(b"POST /engine/control HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        status, _, _ = await read_response(reader, head_only=True)
        assert status == 100
        writer.write(b"{}")
        status, _, body = await read_response(reader)
        assert status == 200
        assert json.loads(body)["echo"] == {}
    finally:
        writer.close()


# -- protocol edges (raw sockets) ------------------------------------------------------------
async def test_pipelined_requests_are_answered_in_order(server: StatusServer) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(
            b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /engine/control HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        first, second, third = [await read_response(reader) for _ in range(3)]
        assert first[0] == 200 and json.loads(first[2]) == {"status": "live"}
        assert second[0] == 200 and json.loads(second[2])["echo"] == {"a": 1}
        assert third[0] == 404 and third[1]["connection"] == "close"
        assert await at_eof(reader)
    finally:
        writer.close()


async def test_http10_closes_unless_keep_alive(server: StatusServer) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        writer.write(b"GET /live HTTP/1.0\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await at_eof(reader)
    finally:
        writer.close()


async def test_head_has_length_but_no_body(server: StatusServer) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(b"HEAD /live HTTP/1.1\r\nHost: x\r\n\r\nGET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_response(reader, head_only=True)
        assert status == 200
        assert int(headers["content-length"]) == len(b'{"status":"live"}')
        # The next bytes are the second response, proving HEAD sent no body.
        status, _, body = await read_response(reader)
        assert status == 200 and body == b'{"status":"live"}'
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /live HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET /live HTTP/2.0\r\n\r\n", 505),
        (b"GET /live HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /live HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"POST /engine/control HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /engine/control HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", 400),
        (b"POST /engine/control HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /live HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
        (b"GET /live HTTP/1.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n", 431),
        (b"GET live HTTP/1.1\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_are_rejected(
    server: StatusServer, request_bytes: bytes, expected: int
) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(request_bytes)
        status, headers, body = await read_response(reader)
        assert status == expected
        assert headers["connection"] == "close"
        assert json.loads(body)["status"] == "error"
        assert await at_eof(reader)
    finally:
        writer.close()


async def test_leading_empty_lines_and_absolute_form_are_accepted(server: StatusServer) -> None:
    status, _, _ = await raw_exchange(
        server, b"\r\nGET http://127.0.0.1/live HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 200


async def test_close_ends_idle_keep_alive_connections_and_stops_listening(
    metrics: WorkerMetrics,
) -> None:
    srv = StatusServer(metrics=metrics.render)
    await srv.start()
    port = srv.port
    reader, writer = await connect(srv)
    try:
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        async with asyncio.timeout(TIMEOUT):
            await srv.close()
        assert await at_eof(reader)
    finally:
        writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await srv.close()  # idempotent
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no connection task left behind


async def test_close_cancels_a_handler_in_flight() -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(body: bytes) -> tuple[int, str, bytes]:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    srv = StatusServer()
    srv.add_route("POST", "/stuck", stuck)
    await srv.start()
    reader, writer = await connect(srv)
    try:
        writer.write(b"POST /stuck HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            await entered.wait()
            await srv.close()
        assert cancelled.is_set()
        assert await at_eof(reader)
    finally:
        writer.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.parametrize("sent", [b"", b"GET /live HTTP/1.1\r\nHost:"])
async def test_idle_or_stalled_connections_are_closed_after_read_timeout(sent: bytes) -> None:
    srv = StatusServer(read_timeout=0.05)
    await srv.start()
    try:
        reader, writer = await connect(srv)
        writer.write(sent)
        assert await at_eof(reader)  # the server hung up on its own
        writer.close()
    finally:
        await srv.close()


def test_route_registration_rules() -> None:
    srv = StatusServer()
    with pytest.raises(ValueError):
        srv.add_route("GET", "/live", echo)
    with pytest.raises(ValueError):
        srv.add_route("POST", "no-slash", echo)
    with pytest.raises(ValueError):
        srv.add_route("HEAD", "/x", echo)
    with pytest.raises(RuntimeError):
        _ = srv.port
