"""Request plane: frames, server and client over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import pytest

from dynamo_backend_common.errors import BackendError, DynamoError, WorkerDraining
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.transport import (
    Handler,
    RequestPlaneClient,
    RequestPlaneServer,
)
from dynamo_backend_common.runtime.transport import frames as fr

pytestmark = pytest.mark.timeout(30)

Headers = Mapping[str, str]


@asynccontextmanager
async def serve(
    **endpoints: Handler,
) -> AsyncIterator[tuple[RequestPlaneServer, RequestPlaneClient]]:
    server = RequestPlaneServer()
    for name, handler in endpoints.items():
        server.add_endpoint(name, handler)
    await server.start()
    client = RequestPlaneClient(connect_timeout=2.0)
    try:
        yield server, client
    finally:
        await client.close()
        await server.close(timeout=2.0)


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a monotonic condition inside the server that exposes no event to wait on."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - only for state no event can signal
            await asyncio.sleep(0.002)


def port_of(server: RequestPlaneServer) -> int:
    return int(server.address.rpartition(":")[2])


async def numbers(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
    """``b"<n>:<tag>"`` -> n items ``b"<tag>-<i>"``."""
    n, _, tag = payload.partition(b":")
    for i in range(int(n)):
        yield tag + b"-%d" % i


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [item async for item in it]


# -- frames ---------------------------------------------------------------------------------
def test_frame_reader_reassembles_split_frames() -> None:
    wire = (
        fr.encode_frame(fr.DATA, 7, b"hello")
        + fr.encode_frame(fr.END, 7)
        + fr.encode_frame(fr.DATA, 2**64 - 1, b"x" * 1000)
    )
    reader = fr.FrameReader()
    got: list[tuple[int, int, bytes]] = []
    for i in range(len(wire)):  # worst case: one byte per read
        got += reader.feed(wire[i : i + 1])
    assert got == [(fr.DATA, 7, b"hello"), (fr.END, 7, b""), (fr.DATA, 2**64 - 1, b"x" * 1000)]
    assert reader.feed(wire) == got  # and all at once


def test_frame_reader_rejects_oversize_and_unknown_kind() -> None:
    with pytest.raises(fr.FrameError, match="exceeds"):
        fr.FrameReader(max_frame_bytes=100).feed(fr.HEADER.pack(101, fr.DATA, 1))
    with pytest.raises(fr.FrameError, match="unknown frame kind"):
        fr.FrameReader().feed(fr.HEADER.pack(0, 99, 1))
    env = fr.decode_request(fr.encode_request("gen", {"a": "b"}, b"\x00\xff"))
    assert (env.endpoint, env.headers, env.payload) == ("gen", {"a": "b"}, b"\x00\xff")
    with pytest.raises(fr.FrameError):
        fr.decode_request(b"\xc1garbage")


# -- basic streaming ------------------------------------------------------------------------
async def test_round_trip_and_unary_call() -> None:
    seen_ids: list[str] = []

    async def echo(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        seen_ids.append(ctx.id)
        yield headers.get("h", "").encode() + b"|" + payload

    async with serve(numbers=numbers, echo=echo) as (server, client):
        items = await collect(client.stream(server.address, "numbers", b"5:a"))
        assert items == [b"a-0", b"a-1", b"a-2", b"a-3", b"a-4"]
        assert await collect(client.stream(server.address, "numbers", b"0:a")) == []
        reply = await client.call(server.address, "echo", b"\x00" * 3, headers={"h": "v"})
        assert reply == b"v|\x00\x00\x00"
        ctx = Context("req-42")
        await client.call(server.address, "echo", b"", ctx)
        assert seen_ids[-1] == "req-42"  # ctx.id travels as x-request-id
        with pytest.raises(DynamoError) as ei:
            await client.call(server.address, "numbers", b"2:x")
        assert ei.value.kind is BackendError.Unknown
        with pytest.raises(DynamoError) as ei:
            await client.call(server.address, "numbers", b"0:x")
        assert ei.value.kind is BackendError.StreamIncomplete
        assert server.stats.connections == 1  # one persistent connection for all of it
        assert server.inflight == 0  # a stream is accounted for before its END arrives


async def test_200_concurrent_streams_share_one_connection() -> None:
    async def slow(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        for i in range(5):
            await asyncio.sleep(0)  # interleave the streams
            yield payload + b"/%d" % i

    async with serve(slow=slow) as (server, client):
        results = await asyncio.gather(
            *(collect(client.stream(server.address, "slow", b"s%d" % k)) for k in range(200))
        )
        for k, items in enumerate(results):
            assert items == [b"s%d/%d" % (k, i) for i in range(5)]
        assert server.stats.connections == 1
        assert server.stats.streams == 200


async def test_1000_concurrent_streams() -> None:
    release = asyncio.Event()
    all_started = asyncio.Event()
    started = 0

    async def gated(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        nonlocal started
        started += 1
        if started == 1000:
            all_started.set()
        await release.wait()
        yield payload

    async with serve(gated=gated) as (server, client):
        tasks = [
            asyncio.create_task(collect(client.stream(server.address, "gated", b"%d" % k)))
            for k in range(1000)
        ]
        await asyncio.wait_for(all_started.wait(), 10)
        assert server.inflight == 1000  # all of them running at once on one connection
        release.set()
        results = await asyncio.gather(*tasks)
        assert results == [[b"%d" % k] for k in range(1000)]
        assert server.inflight == 0


# -- errors ---------------------------------------------------------------------------------
async def test_typed_errors_keep_their_kind() -> None:
    async def invalid(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        raise DynamoError.invalid_argument("max_tokens must be positive")
        yield b""  # pragma: no cover

    async def draining(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        raise WorkerDraining()
        yield b""  # pragma: no cover

    async def broken(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        yield b"first"
        raise ValueError("boom")

    async with serve(invalid=invalid, draining=draining, broken=broken) as (server, client):
        with pytest.raises(DynamoError) as ei:
            await collect(client.stream(server.address, "invalid", b""))
        assert ei.value.kind is BackendError.InvalidArgument
        assert ei.value.message == "max_tokens must be positive"

        with pytest.raises(DynamoError) as ei:
            await collect(client.stream(server.address, "draining", b""))
        assert ei.value.kind is BackendError.EngineShutdown
        assert ei.value.message == WorkerDraining().message

        got: list[bytes] = []
        with pytest.raises(DynamoError) as ei:
            async for item in client.stream(server.address, "broken", b""):
                got.append(item)
        assert got == [b"first"]  # items before the failure are delivered
        assert ei.value.kind is BackendError.Unknown
        assert "ValueError: boom" in ei.value.message


async def test_unknown_endpoint_is_cannot_connect() -> None:
    async with serve(numbers=numbers) as (server, client):
        with pytest.raises(DynamoError) as ei:
            await collect(client.stream(server.address, "nope", b""))
        assert ei.value.kind is BackendError.CannotConnect
        assert ei.value.message == "unknown endpoint: nope"
        # The connection survives it.
        assert await collect(client.stream(server.address, "numbers", b"1:z")) == [b"z-0"]
        assert server.stats.connections == 1


async def test_connection_refused_is_cannot_connect() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    client = RequestPlaneClient()
    try:
        with pytest.raises(DynamoError) as ei:
            await collect(client.stream(f"127.0.0.1:{port}", "x", b""))
        assert ei.value.kind is BackendError.CannotConnect
    finally:
        await client.close()


# -- cancellation ---------------------------------------------------------------------------
async def test_stop_reaches_handler_ctx() -> None:
    stop_seen = asyncio.Event()

    async def stoppable(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        yield b"token"
        await asyncio.wait_for(ctx.stopped(), timeout=1.0)  # fails the stream if STOP is late
        stop_seen.set()
        assert not ctx.is_killed()
        yield b"cancelled"

    async with serve(stoppable=stoppable) as (server, client):
        ctx = Context()
        items = []
        t0 = time.perf_counter()
        async for item in client.stream(server.address, "stoppable", b"", ctx):
            items.append(item)
            if item == b"token":
                t0 = time.perf_counter()
                ctx.stop_generating()
        assert items == [b"token", b"cancelled"]  # the stream finished gracefully
        assert stop_seen.is_set()
        assert time.perf_counter() - t0 < 1.0


async def test_kill_drops_the_stream_on_both_sides() -> None:
    handler_ctx: list[Context] = []
    closed = asyncio.Event()

    async def endless(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        handler_ctx.append(ctx)
        try:
            while True:
                yield b"tok"
                await asyncio.sleep(0)
        finally:
            closed.set()

    async with serve(endless=endless, numbers=numbers) as (server, client):
        ctx = Context()
        n = 0
        with pytest.raises(DynamoError) as ei:
            async with asyncio.timeout(2):
                async for _ in client.stream(server.address, "endless", b"", ctx):
                    n += 1
                    if n == 3:
                        ctx.kill()
        assert ei.value.kind is BackendError.Cancelled
        assert n == 3  # nothing is delivered after the kill
        await asyncio.wait_for(closed.wait(), 1.0)  # the handler's generator was closed
        assert handler_ctx[0].is_killed() and handler_ctx[0].is_stopped()
        await client.call(server.address, "numbers", b"1:a")  # a later round trip: by now
        assert server.inflight == 0  # the dropped stream's task is accounted for


async def test_kill_after_stop_is_forwarded() -> None:
    handler_ctx: list[Context] = []

    async def stubborn(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        handler_ctx.append(ctx)
        yield b"tok"
        await asyncio.Event().wait()  # ignores the stop; only a kill ends it

    async with serve(stubborn=stubborn, numbers=numbers) as (server, client):
        ctx = Context()
        stream = client.stream(server.address, "stubborn", b"", ctx)
        assert await anext(stream) == b"tok"
        ctx.stop_generating()
        await asyncio.wait_for(handler_ctx[0].stopped(), 1.0)
        assert not handler_ctx[0].is_killed()
        ctx.kill()
        with pytest.raises(DynamoError) as ei:
            await asyncio.wait_for(anext(stream), 1.0)
        assert ei.value.kind is BackendError.Cancelled
        await asyncio.wait_for(handler_ctx[0].killed(), 1.0)
        await client.call(server.address, "numbers", b"1:a")  # a later round trip: by now
        assert server.inflight == 0  # the dropped stream's task is accounted for


async def test_abandoned_iterator_sends_stop() -> None:
    handler_ctx: list[Context] = []

    async def endless(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        handler_ctx.append(ctx)
        while not ctx.is_stopped():
            yield b"tok"
            await asyncio.sleep(0)

    async with serve(endless=endless, numbers=numbers) as (server, client):
        stream = client.stream(server.address, "endless", b"")
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.wait_for(handler_ctx[0].stopped(), 1.0)
        assert not handler_ctx[0].is_killed()
        await client.call(server.address, "numbers", b"1:a")  # a later round trip: by now
        assert server.inflight == 0  # the dropped stream's task is accounted for


# -- connection loss ------------------------------------------------------------------------
async def test_server_connection_loss_raises_disconnected_promptly() -> None:
    """A raw server answers one DATA frame, then drops the connection."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(fr.HEADER_SIZE)
        length, kind, sid = fr.HEADER.unpack(header)
        await reader.readexactly(length)
        assert kind == fr.REQUEST
        writer.write(fr.encode_frame(fr.DATA, sid, b"one"))
        await writer.drain()
        writer.transport.abort()

    raw = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    client = RequestPlaneClient()
    try:
        stream = client.stream(f"127.0.0.1:{port}", "gen", b"")
        assert await anext(stream) == b"one"
        t0 = time.perf_counter()
        with pytest.raises(DynamoError) as ei:
            await asyncio.wait_for(anext(stream), 1.0)
        assert ei.value.kind is BackendError.Disconnected
        assert time.perf_counter() - t0 < 1.0
    finally:
        await client.close()
        raw.close()
        await raw.wait_closed()


async def test_client_reconnects_after_loss() -> None:
    async def hang(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        yield b"tok"
        await asyncio.Event().wait()

    async with serve(numbers=numbers, hang=hang) as (server, client):
        stream = client.stream(server.address, "hang", b"")
        assert await anext(stream) == b"tok"
        for conn in list(server._connections):
            conn.abort()  # the server side drops the connection
        with pytest.raises(DynamoError) as ei:
            await asyncio.wait_for(anext(stream), 1.0)
        assert ei.value.kind is BackendError.Disconnected
        assert await client.call(server.address, "numbers", b"1:b") == b"b-0"
        assert server.stats.connections == 2


async def test_client_drop_closes_handler_without_stopping_ctx() -> None:
    handler_ctx: list[Context] = []
    finally_ran = asyncio.Event()

    async def endless(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        handler_ctx.append(ctx)
        try:
            yield b"tok"
            await asyncio.Event().wait()
        finally:
            finally_ran.set()

    async with serve(endless=endless, numbers=numbers) as (server, client):
        stream = client.stream(server.address, "endless", b"")
        assert await anext(stream) == b"tok"
        await client.close()  # the process on the other side goes away
        await asyncio.wait_for(finally_ran.wait(), 1.0)
        ctx = handler_ctx[0]
        assert not ctx.is_stopped() and not ctx.is_killed()  # a drop is not a cancel
        with pytest.raises(DynamoError) as ei:
            await anext(stream)
        assert ei.value.kind is BackendError.Disconnected
        async with RequestPlaneClient() as other:
            await other.call(server.address, "numbers", b"1:a")  # a later round trip: by now
        assert server.inflight == 0  # the dropped stream's task is accounted for


async def test_server_close_ends_streams_with_engine_shutdown() -> None:
    finally_ran = asyncio.Event()

    async def endless(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        try:
            yield b"tok"
            await asyncio.Event().wait()
        finally:
            finally_ran.set()

    async with serve(endless=endless, numbers=numbers) as (server, client):
        stream = client.stream(server.address, "endless", b"")
        assert await anext(stream) == b"tok"
        await server.close(timeout=1.0)
        with pytest.raises(DynamoError) as ei:
            await asyncio.wait_for(anext(stream), 1.0)
        assert ei.value.kind is BackendError.EngineShutdown
        assert finally_ran.is_set()
        assert server.inflight == 0


async def test_stop_accepting_keeps_existing_connections() -> None:
    gate = asyncio.Event()

    async def gated(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        yield b"a"
        await gate.wait()
        yield b"b"

    async with serve(gated=gated) as (server, client):
        stream = client.stream(server.address, "gated", b"")
        assert await anext(stream) == b"a"
        await server.stop_accepting()
        async with RequestPlaneClient() as newcomer:
            with pytest.raises(DynamoError) as ei:
                await newcomer.call(server.address, "gated", b"")
        assert ei.value.kind is BackendError.CannotConnect
        gate.set()
        assert await collect(stream) == [b"b"]  # the open stream carries on
        # and the existing connection still takes new streams
        assert await collect(client.stream(server.address, "gated", b"")) == [b"a", b"b"]


# -- output path ----------------------------------------------------------------------------
async def test_items_ready_together_share_one_write() -> None:
    async with serve(numbers=numbers) as (server, client):
        await client.call(server.address, "numbers", b"1:warm")
        writes, frames = server.stats.writes, server.stats.frames_out
        items = await collect(client.stream(server.address, "numbers", b"100:x"))
        assert len(items) == 100
        assert server.stats.frames_out - frames == 101  # 100 DATA + END
        assert server.stats.writes - writes <= 2  # ... in one or two socket writes

        # Many streams finishing in the same loop iteration also share writes.
        writes = server.stats.writes
        results = await asyncio.gather(
            *(collect(client.stream(server.address, "numbers", b"3:y")) for _ in range(50))
        )
        assert all(len(r) == 3 for r in results)
        assert server.stats.writes - writes < 10  # 200 frames


async def test_backpressure_bounds_server_buffering() -> None:
    item = b"x" * 65536
    produced = 0

    async def firehose(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(1000):  # 64 MiB if nothing pushed back
            produced += 1
            yield item

    async with serve(firehose=firehose) as (server, _client):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        try:
            writer.write(fr.encode_frame(fr.REQUEST, 1, fr.encode_request("firehose", {}, b"")))
            await wait_until(lambda: server.stats.pauses > 0)  # we read nothing: it must pause
            paused_at = produced
            assert paused_at < 300  # bounded: the high-water mark plus kernel socket buffers
            assert server.inflight == 1
            received = 0
            while True:  # now drain everything: the producer resumes and finishes
                header = await reader.readexactly(fr.HEADER_SIZE)
                length, kind, sid = fr.HEADER.unpack(header)
                await reader.readexactly(length)
                if kind == fr.END:
                    break
                assert kind == fr.DATA and sid == 1 and length == len(item)
                received += 1
            assert received == produced == 1000
        finally:
            writer.close()
            await writer.wait_closed()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # huge length prefix
        fr.HEADER.pack(3, 200, 1) + b"abc",  # unknown kind
        fr.encode_frame(fr.REQUEST, 1, b"\xc1\xc1\xc1"),  # undecodable envelope
        fr.encode_frame(fr.DATA, 1, b"x"),  # a server-to-client kind
    ],
)
async def test_garbage_closes_only_that_connection(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(numbers=numbers) as (server, client):
        assert await client.call(server.address, "numbers", b"1:a") == b"a-0"
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(garbage)
        assert await asyncio.wait_for(reader.read(), 1.0) == b""  # closed by the server
        writer.close()
        await writer.wait_closed()
        # The server and the other connection are unaffected.
        assert await client.call(server.address, "numbers", b"1:b") == b"b-0"
        assert server.stats.connections == 2
        assert any(
            r.levelname == "ERROR" and "closing connection" in r.getMessage()
            for r in caplog.records
        )


async def test_server_protocol_error_fails_client_streams() -> None:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(fr.HEADER_SIZE)
        writer.write(b"\xff" * 64)  # not a frame
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    raw = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    client = RequestPlaneClient()
    try:
        with pytest.raises(DynamoError) as ei:
            await asyncio.wait_for(collect(client.stream(f"127.0.0.1:{port}", "g", b"")), 1.0)
        assert ei.value.kind is BackendError.Disconnected
    finally:
        await client.close()
        raw.close()
        await raw.wait_closed()


async def test_handler_that_never_awaits_can_still_be_stopped() -> None:
    async def spinning(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        while not ctx.is_stopped():  # never awaits: only the server's pacing lets STOP in
            yield b"0123456789"
        yield b"stopped"

    async with serve(spinning=spinning) as (server, client):
        ctx = Context()
        last = b""
        n = 0
        async with asyncio.timeout(5):
            async for item in client.stream(server.address, "spinning", b"", ctx):
                n += 1
                if n == 10:
                    ctx.stop_generating()
                last = item
        assert last == b"stopped"
        # The server yielded after each large flush, not only when backpressure paused it.
        assert server.stats.pauses == 0


async def test_frame_limits_fail_only_the_offending_stream() -> None:
    async def big(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        yield b"small"
        yield b"x" * 2000

    server = RequestPlaneServer(max_frame_bytes=1000)
    server.add_endpoint("big", big)
    server.add_endpoint("numbers", numbers)
    await server.start()
    try:
        async with RequestPlaneClient(max_frame_bytes=1000) as client:
            got: list[bytes] = []
            with pytest.raises(DynamoError) as ei:
                async for item in client.stream(server.address, "big", b""):
                    got.append(item)
            assert got == [b"small"]
            assert ei.value.kind is BackendError.Unknown and "frame limit" in ei.value.message
            with pytest.raises(DynamoError) as ei:
                await client.call(server.address, "numbers", b"y" * 2000)
            assert ei.value.kind is BackendError.InvalidArgument
            # Neither closed the connection.
            assert await client.call(server.address, "numbers", b"1:a") == b"a-0"
            assert server.stats.connections == 1
    finally:
        await server.close(timeout=1.0)


async def test_ping_is_answered_with_pong() -> None:
    async with serve() as (server, _client):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        try:
            writer.write(fr.encode_frame(fr.PING, 0, b"hi"))
            header = await asyncio.wait_for(reader.readexactly(fr.HEADER_SIZE), 1.0)
            length, kind, sid = fr.HEADER.unpack(header)
            assert (kind, sid) == (fr.PONG, 0)
            assert await reader.readexactly(length) == b"hi"
        finally:
            writer.close()
            await writer.wait_closed()


async def test_client_close_fails_open_streams_and_later_use() -> None:
    async def hang(payload: bytes, ctx: Context, headers: Headers) -> AsyncIterator[bytes]:
        yield b"tok"
        await asyncio.Event().wait()

    async with serve(hang=hang) as (server, client):
        stream = client.stream(server.address, "hang", b"")
        assert await anext(stream) == b"tok"
        waiting = asyncio.create_task(anext(stream))
        await client.close()
        with pytest.raises(DynamoError) as ei:
            await asyncio.wait_for(waiting, 1.0)
        assert ei.value.kind is BackendError.Disconnected
        with pytest.raises(DynamoError) as ei:
            await client.call(server.address, "hang", b"")
        assert ei.value.kind is BackendError.CannotConnect
