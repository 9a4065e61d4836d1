"""Dynamo 1.6.1's TCP request plane (``runtime/transport/callhome.py``): golden bytes captured
between the real Dynamo frontend and mocker, our server and client over real sockets, and bad
input from the wire."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import msgspec
import pytest

from dynamo_backend_common.errors import BackendError, DynamoError
from dynamo_backend_common.protocols.codec import from_msgpack
from dynamo_backend_common.protocols.common import LLMEngineOutput, PreprocessedRequest
from dynamo_backend_common.runtime.context import Context
from dynamo_backend_common.runtime.transport.callhome import (
    CallHomeClient,
    CallHomeServer,
    decode_twoparts,
    encode_request_frame,
    twopart,
)

GOLDEN = Path(__file__).parent / "golden" / "dynamo-1.6.1" / "tcp"
CAPTURES = sorted(p.name.removesuffix(".request_frame.bin")
                  for p in GOLDEN.glob("0*.request_frame.bin"))
PATH = "abc/ns/backend/generate"
TIMEOUT = 10.0


def parse_request_frame(data: bytes) -> tuple[str, dict[str, str], bytes, bytes]:
    (plen,) = struct.unpack_from(">H", data, 0)
    path = data[2:2 + plen].decode()
    (hlen,) = struct.unpack_from(">H", data, 2 + plen)
    headers = json.loads(data[4 + plen:4 + plen + hlen])
    (size,) = struct.unpack_from(">I", data, 4 + plen + hlen)
    payload = data[8 + plen + hlen:]
    assert len(payload) == size
    ((control, body),) = decode_twoparts(bytearray(payload))
    return path, headers, control, body


@pytest.mark.parametrize("name", CAPTURES)
def test_golden_request_frames_parse(name: str) -> None:
    path, headers, control_b, body = parse_request_frame(
        (GOLDEN / f"{name}.request_frame.bin").read_bytes())
    assert path.endswith("/dynamo/backend/generate") and headers["x-endpoint-path"] == path
    control = json.loads(control_b)
    assert control["id"] == headers["request-id"]
    assert control["payload_codec"] == "msgpack"
    info = json.loads(control["connection_info"]["info"])
    assert control["connection_info"]["transport"] == "tcp_server"
    assert info["stream_type"] == "response" and info["address"].startswith("127.0.0.1:")
    req = from_msgpack(body, PreprocessedRequest)  # Dynamo's body decodes as our type
    assert req.token_ids and req.stop_conditions.max_tokens is not None
    assert (GOLDEN / f"{name}.ack.bin").read_bytes() == b"\x00\x00\x00\x00"
    # Our encoder writes the same frame for the same content.
    again = encode_request_frame(path, headers, control_b, body)
    assert parse_request_frame(again) == (path, headers, control_b, body)


@pytest.mark.parametrize("name", CAPTURES)
def test_golden_response_streams_parse(name: str) -> None:
    data = (GOLDEN / f"{name}.response_stream.bin").read_bytes()
    msgs = decode_twoparts(bytearray(data))
    assert json.loads(msgs[0][0])["stream_type"] == "response" and msgs[0][1] == b""
    assert msgs[1] == (b'{"error":null}', b"")
    killed = (GOLDEN / f"{name}.response_stream_in.bin").exists()
    if killed:
        # The frontend's cancellation is one header-only "kill" message, byte for byte ours.
        assert (GOLDEN / f"{name}.response_stream_in.bin").read_bytes() == twopart(b'"kill"')
        items = msgs[2:]
    else:
        # The end of a stream, byte for byte what our server writes.
        assert msgs[-1] == (b'"sentinel"', b"")
        assert msgs[-2] == (b"", b"\x81\xaecomplete_final\xc3")
        items = msgs[2:-2]
    for header, body in items:
        assert header == b""
        wrapper = msgspec.msgpack.decode(body)
        assert wrapper["complete_final"] is False
        out = msgspec.msgpack.decode(msgspec.msgpack.encode(wrapper["data"]["data"]))
        from_msgpack(msgspec.msgpack.encode(out), LLMEngineOutput)
    if not killed:
        last = msgspec.msgpack.decode(items[-1][1])["data"]["data"]
        assert last["finish_reason"] in ("length", "stop")


# -- our server and client over real sockets ---------------------------------------------------


async def counting(body: bytes, ctx: Context, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    """Yields ``n`` tokens (msgpack ``{"n", "delay"}`` body), ends ``cancelled`` when stopped."""
    req = msgspec.msgpack.decode(body)
    for i in range(req["n"]):
        if ctx.is_stopped():
            yield msgspec.msgpack.encode({"token_ids": [], "finish_reason": "cancelled"})
            return
        yield msgspec.msgpack.encode({"token_ids": [i]})
        await asyncio.sleep(req.get("delay", 0))
    if req.get("fail"):
        raise DynamoError(BackendError.InvalidArgument, "no such thing")
    yield msgspec.msgpack.encode({"token_ids": [], "finish_reason": "length"})


def body(n: int, **kw: object) -> bytes:
    return msgspec.msgpack.encode({"n": n, **kw})


async def tokens(client: CallHomeClient, address: str, payload: bytes, ctx: Context | None = None,
                 codec: str = "msgpack") -> list[dict[str, object]]:
    return [msgspec.msgpack.decode(x)
            async for x in client.stream(address, PATH, payload, ctx, codec=codec)]


@pytest.fixture
async def server() -> AsyncIterator[CallHomeServer]:
    async with CallHomeServer() as srv:
        srv.add_endpoint(PATH, counting)
        yield srv


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_stream_roundtrip_both_codecs(server: CallHomeServer, codec: str) -> None:
    async with CallHomeClient() as client:
        got = await tokens(client, server.address, body(5), codec=codec)
    assert [x["token_ids"] for x in got] == [[0], [1], [2], [3], [4], []]
    assert got[-1]["finish_reason"] == "length"


async def test_many_concurrent_streams_share_one_request_connection(
        server: CallHomeServer) -> None:
    async with CallHomeClient() as client:
        results = await asyncio.gather(*[tokens(client, server.address, body(8))
                                         for _ in range(100)])
    assert all(len(r) == 9 for r in results)
    assert server.stats.connections == 1 and server.stats.streams == 100


async def test_handler_error_arrives_typed(server: CallHomeServer) -> None:
    async with CallHomeClient() as client:
        with pytest.raises(DynamoError) as err:
            await tokens(client, server.address, body(2, fail=True))
    assert err.value.kind is BackendError.InvalidArgument and "no such thing" in err.value.message


async def test_stop_lets_the_stream_end_cancelled(server: CallHomeServer) -> None:
    ctx = Context()
    got = []
    async with CallHomeClient() as client:
        async for raw in client.stream(server.address, PATH, body(10_000, delay=0.001), ctx):
            got.append(msgspec.msgpack.decode(raw))
            if len(got) == 3:
                ctx.stop_generating()
    assert got[-1]["finish_reason"] == "cancelled"


async def test_kill_reaches_the_handlers_context_and_ends_the_stream() -> None:
    seen: list[Context] = []
    done = asyncio.Event()

    async def handler(b: bytes, ctx: Context, h: Mapping[str, str]) -> AsyncIterator[bytes]:
        seen.append(ctx)
        try:
            while True:
                yield msgspec.msgpack.encode({"token_ids": [1]})
                await asyncio.sleep(0.001)
        finally:
            done.set()

    async with CallHomeServer() as srv, CallHomeClient() as client:
        srv.add_endpoint(PATH, handler)
        ctx = Context()
        with pytest.raises(DynamoError) as err:
            async for _ in client.stream(srv.address, PATH, b"\x80", ctx):
                ctx.kill()
        assert err.value.kind is BackendError.Cancelled
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert seen[0].is_killed()


async def test_a_plain_drop_cancels_the_handler_without_touching_ctx() -> None:
    seen: list[Context] = []
    done = asyncio.Event()

    async def handler(b: bytes, ctx: Context, h: Mapping[str, str]) -> AsyncIterator[bytes]:
        seen.append(ctx)
        try:
            while True:
                yield msgspec.msgpack.encode({"token_ids": [1]})
                await asyncio.sleep(0.001)
        finally:
            done.set()

    async with CallHomeServer() as srv:
        srv.add_endpoint(PATH, handler)
        client = CallHomeClient()
        stream = client.stream(srv.address, PATH, b"\x80")
        await anext(stream)
        await client.close()
        with pytest.raises(DynamoError):
            await anext(stream)
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert not seen[0].is_stopped()


async def test_unknown_endpoint_is_refused_with_dynamos_text(server: CallHomeServer) -> None:
    async with CallHomeClient() as client:
        with pytest.raises(DynamoError, match="Server unavailable: unknown endpoint nope") as err:
            async for _ in client.stream(server.address, "nope", body(1)):
                pass
    assert err.value.kind is BackendError.CannotConnect


async def test_server_close_ends_streams_with_engine_shutdown() -> None:
    srv = CallHomeServer()
    await srv.start()
    srv.add_endpoint(PATH, counting)
    async with CallHomeClient() as client:
        stream = client.stream(srv.address, PATH, body(100_000, delay=0.001))
        await anext(stream)
        closing = asyncio.create_task(srv.close())
        with pytest.raises(DynamoError) as err:
            async for _ in stream:
                pass
        await closing
    assert err.value.kind is BackendError.EngineShutdown


# -- bad input from the wire -------------------------------------------------------------------


async def raw_request(address: str, data: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), TIMEOUT))
        return await reader.readexactly(n)
    finally:
        writer.close()


async def test_garbage_frame_is_counted_and_the_server_keeps_serving(
        server: CallHomeServer) -> None:
    huge = struct.pack(">H", 1) + b"x" + struct.pack(">H", 2) + b"{}" + struct.pack(">I", 2**31)
    text = await raw_request(server.address, huge)
    assert text.startswith(b"Protocol error")
    assert server.stats.protocol_errors == 1
    async with CallHomeClient() as client:
        assert len(await tokens(client, server.address, body(2))) == 3


async def test_undecodable_control_message_gets_a_refusing_ack(server: CallHomeServer) -> None:
    frame = encode_request_frame(PATH, {}, b"{not json", b"")
    assert (await raw_request(server.address, frame)).startswith(b"Deserialization Error")
    assert server.stats.decode_errors == 1


async def test_unknown_codec_and_bad_body_are_typed_errors(server: CallHomeServer) -> None:
    async with CallHomeClient() as client:
        # A body the handler cannot decode: a typed error item, not a hang.
        with pytest.raises(DynamoError) as err:
            async for _ in client.stream(server.address, PATH, b"\xc1"):
                pass
        assert err.value.kind is BackendError.Unknown
        with pytest.raises(DynamoError, match="unknown payload codec"):
            await tokens(client, server.address, body(1), codec="cbor")


async def test_a_worker_that_never_calls_back_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"\x00\x00\x00\x00")  # accepted... and then nothing, like Dynamo
        await writer.drain()
        await reader.read()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with CallHomeClient(callback_timeout=0.3) as client:
            with pytest.raises(DynamoError) as err:
                await tokens(client, f"127.0.0.1:{port}", body(1))
        assert err.value.kind is BackendError.ResponseTimeout
    finally:
        srv.close()


async def test_truncated_response_stream_is_a_disconnect() -> None:
    """A worker that dies mid-stream (no complete_final): the stream fails Disconnected, so a
    frontend migrates it."""

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        _, _, control, _ = parse_request_frame(data)
        info = json.loads(json.loads(control)["connection_info"]["info"])
        writer.write(b"\x00\x00\x00\x00")
        host, _, port = info["address"].rpartition(":")
        _, back = await asyncio.open_connection(host, int(port))
        back.write(twopart(json.dumps({"subject": info["subject"],
                                       "stream_type": "response"}).encode()))
        back.write(twopart(b'{"error":null}'))
        back.write(twopart(b"", msgspec.msgpack.encode(
            {"data": {"data": {"token_ids": [7]}}, "complete_final": False})))
        await back.drain()
        back.close()

    srv = await asyncio.start_server(dying, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    got: list[object] = []
    try:
        async with CallHomeClient() as client:
            with pytest.raises(DynamoError) as err:
                async for raw in client.stream(f"127.0.0.1:{port}", PATH, body(1)):
                    got.append(msgspec.msgpack.decode(raw))
        assert got == [{"token_ids": [7]}]
        assert err.value.kind is BackendError.Disconnected
    finally:
        srv.close()


async def test_wait_dialed_holds_until_every_accepted_request_has_called_home() -> None:
    """Shutdown unregisters only once no accepted request still waits for its call-home
    connection (a Dynamo frontend fails those when the instance leaves discovery)."""
    # A call-home listener whose accept queue is full: the server's dial-back hangs in connect.
    home = socket.socket()
    home.bind(("127.0.0.1", 0))
    home.listen(0)
    fillers = []
    for _ in range(2):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(home.getsockname())
        fillers.append(f)  # loopback handshakes complete inside connect_ex
    async with CallHomeServer(connect_timeout=1.0) as srv:
        srv.add_endpoint(PATH, counting)
        assert await srv.wait_dialed(0)  # nothing accepted yet
        info = {"address": f"127.0.0.1:{home.getsockname()[1]}", "subject": "s1",
                "stream_type": "response"}
        control = json.dumps({"id": "r1", "payload_codec": "msgpack", "connection_info": {
            "transport": "tcp_server", "info": json.dumps(info)}}).encode()
        frame = encode_request_frame(PATH, {}, control, body(1))
        assert await raw_request(srv.address, frame) == b""  # accepted
        assert not await srv.wait_dialed(0.2)  # still dialling home
        assert await srv.wait_dialed(TIMEOUT)  # the dial-back gave up (connect_timeout)
        assert srv.stats.protocol_errors == 1
    for s in [home, *fillers]:
        s.close()
