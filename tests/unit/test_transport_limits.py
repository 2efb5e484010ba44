"""Bounded memory per peer: per-type limits, stream and connection caps, buffer budget,
slow streams and out-of-order data, each refused with its typed code while an honest
client on another connection is still served (real RpcServer/RpcClient, loopback QUIC,
real certificates)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import msgpack
import pytest
from aioquic.quic.packet import QuicFrameType

from secure_xfl.crypto import pki
from secure_xfl.errors import ConfigError
from secure_xfl.transport import (
    MalformedRequest,
    RemoteError,
    RpcClient,
    RpcServer,
    StreamReset,
    TlsIdentity,
    TooManyConnections,
    TransportConfig,
)
from secure_xfl.transport.framing import decode_response
from secure_xfl.transport.limits import PREFIX_BYTES, Limits, limits_table, peek_type
from secure_xfl.transport.server import ServerProtocol
from secure_xfl.transport.streams import ERR_TIMEOUT, Inbound
from tests.rpc_harness import Harness, call_once_a_slot_frees

pytestmark = pytest.mark.timeout(60)
HARNESS = Harness("fed-limits")
_IDS: dict[str, TlsIdentity] = {}
CONFIG = TransportConfig(
    handshake_timeout_s=3,
    idle_timeout_s=10,
    stream_timeout_s=3,
    max_concurrent_streams=4,
    max_connections_per_peer=2,
)
LIMITS = limits_table({"hello": 1024, "upload": 200_000})


def identity(name: str, role: str = "client") -> TlsIdentity:
    if name not in _IDS:
        _IDS[name] = HARNESS.identity(role, name)
    return _IDS[name]


def msg(msg_type: str, **fields: object) -> bytes:
    return bytes(msgpack.packb({"t": msg_type, "v": 1, **fields}, use_bin_type=True))


async def handler(_peer: pki.PeerIdentity, payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "big")


@contextlib.asynccontextmanager
async def serving(
    config: TransportConfig = CONFIG, limits: Limits | None = LIMITS, **kwargs: int
) -> AsyncIterator[tuple[RpcServer, int]]:
    server = RpcServer(
        tls=identity("agg", "aggregator"),
        allowed_roles=["client"],
        handler=handler,
        config=config,
        limits=limits,
        **kwargs,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.close()


def client(port: int, name: str = "mallory", config: TransportConfig = CONFIG) -> RpcClient:
    return RpcClient(
        tls=identity(name), server_role="aggregator", host="127.0.0.1", port=port, config=config
    )


async def honest(port: int, payload: bytes | None = None) -> str:
    """An honest client on its own connection: 'ok' or the refusal code."""
    async with client(port, "honest") as c:
        return await code_of(c.call(payload or msg("hello"), timeout=10))


async def code_of(call: object) -> str:
    try:
        await call  # type: ignore[misc]
        return "ok"
    except RemoteError as exc:
        return exc.code


def raw(c: RpcClient, data: bytes, *, fin: bool = False, offset: int = 0) -> Inbound:
    """Open a request stream by hand (at ``offset``: nothing before it is ever sent)."""
    proto = c._protocol
    assert proto is not None
    quic = proto._quic
    sid = quic.get_next_available_stream_id()
    if offset:
        quic.send_stream_data(sid, b"")
        sender = quic._streams[sid].sender
        sender._buffer_start = sender._buffer_stop = sender.highest_offset = offset
    quic.send_stream_data(sid, data, end_stream=fin)
    proto.transmit()
    state = proto.open_inbound(sid, 1 << 20)
    state.watched = False  # only the server may time this stream out
    return state


async def reply(state: Inbound, timeout: float = 5.0) -> str:
    """How the server answered a raw stream: 'ok', the error code, 'reset:0x..' or 'open'."""
    assert state.done is not None
    try:
        data = await asyncio.wait_for(asyncio.shield(state.done), timeout)
    except StreamReset as exc:
        return f"reset:{exc.error_code:#x}"
    except TimeoutError:
        return "open"
    try:
        decode_response(data)
    except RemoteError as exc:
        return exc.code
    return "ok"


async def settle(server: RpcServer, used: int = 0, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.budget.used != used and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.budget.used == used


def upload_head(size: int) -> bytes:
    """The first bytes of an upload whose bin field declares ``size`` bytes."""
    full = msg("upload", round=0, update=b"\0" * 16)
    return full[: full.index(b"\xc4\x10")] + b"\xc6" + size.to_bytes(4, "big")


# ------------------------------------------------------------------------ prefix parsing


@pytest.mark.parametrize(
    ("data", "want"),
    [
        (msg("hello"), "hello"),
        (msg("upload", update=b"x" * 100), "upload"),
        (b"\xde\x00\x02\xd9\x01t\xa4task", "task"),  # map16, str8 key
        (b"\x82\xa1t\xda\x00\x03ack", "ack"),  # str16 value
        (msg("hello")[:1], None),
        (msg("hello")[:4], None),
        (b"\xdf\x00\x00", None),
    ],
)
def test_peek_type_reads_the_first_key(data: bytes, want: str | None) -> None:
    assert peek_type(data) == want


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 10,  # not a map
        b"\x80",  # empty map
        b"\xde\x00\x00",
        b"\x81\xa1v\x01",  # first key is not "t"
        b"\x81\xa1t\x01",  # type is not a string
        b"\x81\xa1t\xd9\x21" + b"x" * 33,  # type too long
        b"\x81\xa1t\xa2\xff\xfe",  # not UTF-8
        b"\x81\xc4\x01t\xa5hello",  # bin, not str
    ],
)
def test_peek_type_refuses_a_bad_prefix(data: bytes) -> None:
    with pytest.raises(MalformedRequest):
        peek_type(data)


def test_peek_type_needs_the_type_within_the_prefix() -> None:
    with pytest.raises(MalformedRequest):
        peek_type(msg("hello")[:4], final=True)
    with pytest.raises(MalformedRequest):  # a 60-byte first key never leaves room
        peek_type(b"\x81\xd9\x3c" + b"k" * 60 + b"\xa1t")
    assert peek_type(b"\x81\xa1t\xa3abc" + b"\0" * 100) == "abc"
    assert PREFIX_BYTES == 64


def test_config_validates_the_new_settings() -> None:
    defaults = TransportConfig()
    assert defaults.max_concurrent_streams == 8
    assert defaults.max_connections_per_peer == 4
    assert defaults.max_buffered_bytes == 256 << 20
    assert defaults.min_request_rate_bytes_s == 32768
    for bad in (
        {"max_connections_per_peer": 0},
        {"max_buffered_bytes": 1000},
        {"min_request_rate_bytes_s": -1.0},
        {"min_request_rate_bytes_s": float("nan")},
        {"max_concurrent_streams": 0},
    ):
        with pytest.raises(ConfigError):
            TransportConfig(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ per-type limits


def test_type_limits_refuse_bytes_as_they_arrive_and_honest_client_is_served() -> None:
    async def main() -> dict[str, str]:
        seen: dict[str, str] = {}
        async with serving() as (server, port), client(port) as m:
            # 300 kB of an upload, never finished: refused although no FIN ever came.
            seen["upload_no_fin"] = await reply(raw(m, upload_head(10**9) + bytes(300_000)))
            seen["hello_2k"] = await reply(raw(m, msg("hello", pad=bytes(2000)), fin=True))
            seen["honest_hello"] = await honest(port)
            seen["honest_upload"] = await honest(port, msg("upload", update=bytes(150_000)))
            seen["same_conn_after"] = await code_of(m.call(msg("hello"), timeout=5))
            await settle(server)
        return seen

    assert asyncio.run(main()) == {
        "upload_no_fin": "message_too_large",
        "hello_2k": "message_too_large",
        "honest_hello": "ok",
        "honest_upload": "ok",
        "same_conn_after": "ok",
    }


def test_bad_prefix_and_unknown_type_are_refused_protocol_before_buffering() -> None:
    async def main() -> dict[str, str]:
        seen: dict[str, str] = {}
        async with serving() as (server, port), client(port) as m:
            seen["garbage"] = await reply(raw(m, b"\x00" * 100_000))
            seen["first_key_v"] = await reply(raw(m, b"\x82\xa1v\x01\xa1t\xa5hello", fin=True))
            seen["unknown_type"] = await reply(raw(m, msg("decrypt", x=bytes(50_000))))
            seen["empty"] = await reply(raw(m, b"", fin=True))
            seen["cut_short"] = await reply(raw(m, msg("hello")[:3], fin=True))
            seen["honest"] = await honest(port)
            await settle(server)
        return seen

    seen = asyncio.run(main())
    assert seen.pop("honest") == "ok"
    assert set(seen.values()) == {"protocol"}, seen


def test_without_limits_any_bytes_up_to_max_message_bytes_reach_the_handler() -> None:
    async def main() -> list[str]:
        async with serving(limits=None) as (server, port), client(port) as m:
            out = [await code_of(m.call(b"\x00 not msgpack", timeout=5))]
            out.append(await code_of(m.call(bytes(300_000), timeout=5)))
            await settle(server)
            return out

    assert asyncio.run(main()) == ["ok", "ok"]


# ---------------------------------------------------------------- streams and connections


def test_streams_beyond_max_concurrent_streams_are_refused_busy() -> None:
    async def main() -> list[str]:
        async with serving() as (server, port), client(port) as m:
            held = [raw(m, upload_head(100_000) + bytes(1000)) for _ in range(4)]
            await asyncio.sleep(0.3)
            out = [await reply(raw(m, msg("hello"), fin=True))]
            out.append(await honest(port))
            out += [await reply(s, timeout=0.2) for s in held]  # still being received
            # The stalled ones time out; their slots and claims are released.
            out.append(await reply(held[0], timeout=10))
            out.append(await code_of(m.call(msg("hello"), timeout=5)))
            await settle(server)
            return out

    assert asyncio.run(main()) == [
        "busy",
        "ok",
        *["open"] * 4,
        f"reset:{ERR_TIMEOUT:#x}",
        "ok",
    ]


def test_connections_beyond_max_connections_per_peer_are_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[str]:
        out = []
        async with serving() as (_server, port):
            first, second = client(port), client(port)
            await first.connect()
            await second.connect()
            try:
                with pytest.raises(TooManyConnections) as info:
                    await client(port).connect()
                out.append(info.value.code)
                out.append(await honest(port))  # another identity is not affected
                out.append(await code_of(second.call(msg("hello"), timeout=5)))
                await first.close()
                out.append(
                    await call_once_a_slot_frees(lambda: client(port), msg("hello"), code_of)
                )
            finally:
                await second.close()
        return out

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(main()) == ["too_many_connections", "ok", "ok", "ok"]
    assert "max_connections_per_peer=2" in caplog.text


# ------------------------------------------------------------------------- buffer budget


def test_buffer_budget_refuses_new_requests_busy_and_releases_claims() -> None:
    config = TransportConfig(
        handshake_timeout_s=3,
        idle_timeout_s=10,
        stream_timeout_s=3,
        max_buffered_bytes=1 << 20,
        max_connections_per_peer=2,
    )
    limits = limits_table({"hello": 1024, "upload": 400_000})

    async def main() -> list[str | int]:
        out: list[str | int] = []
        async with serving(config, limits) as (server, port), client(port, config=config) as m:
            held = [raw(m, upload_head(390_000) + bytes(1000)) for _ in range(2)]
            await settle(server, 800_000)  # each claims its type's whole limit at once
            out.append(await reply(raw(m, upload_head(390_000) + bytes(1000))))
            out.append(await honest(port, msg("upload", update=bytes(300_000))))
            out.append(await honest(port))  # a small request still fits
            proto = m._protocol
            assert proto is not None
            proto.abort_stream(held[0].stream_id, 0x1)  # reset one: its claim is released
            await settle(server, 400_000)
            out.append(await honest(port, msg("upload", update=bytes(300_000))))
            out.append(server.budget.peak)
            await m.close()  # the server drops what the connection held
            await settle(server)
        return out

    out = asyncio.run(main())
    assert out[:4] == ["busy", "busy", "ok", "ok"], out
    assert int(out[4]) <= 1 << 20


def test_budget_is_never_below_the_request_being_admitted() -> None:
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, max_buffered_bytes=1 << 20)

    async def main() -> list[str]:
        limits = limits_table({"hello": 1024, "upload": 3 << 20})
        async with serving(config, limits) as (server, port), client(port, config=config) as m:
            out = [await code_of(m.call(msg("upload", update=bytes(2 << 20)), timeout=20))]
            await settle(server)
            return out

    assert asyncio.run(main()) == ["ok"]


# -------------------------------------------------------------------- slow and gap streams


def test_trickling_stream_is_reset_by_the_minimum_rate(caplog: pytest.LogCaptureFixture) -> None:
    config = TransportConfig(
        handshake_timeout_s=3, stream_timeout_s=0.5, min_request_rate_bytes_s=2000
    )

    async def main() -> tuple[str, float, str]:
        async with serving(config, limit_table_big()) as (server, port):
            async with client(port, config=config) as m:
                state = raw(m, msg("hello")[:-1])
                proto = m._protocol
                assert proto is not None
                start = time.monotonic()
                # 10 bytes every 0.1 s: never idle for stream_timeout_s, but 100 B/s.
                while not state.done.done() and time.monotonic() - start < 10:  # type: ignore[union-attr]
                    proto._quic.send_stream_data(state.stream_id, b"\0" * 10)
                    proto.transmit()
                    await asyncio.sleep(0.1)
                outcome = await reply(state, timeout=1)
                took = time.monotonic() - start
            await settle(server)
            return outcome, took, await honest(port)

    with caplog.at_level(logging.WARNING):
        outcome, took, after = asyncio.run(main())
    assert "too slow" in caplog.text  # not "stalled": it never paused for 0.5 s
    assert outcome == f"reset:{ERR_TIMEOUT:#x}"
    assert took < 4.0, took
    assert after == "ok"


def limit_table_big() -> Limits:
    return limits_table({"hello": 1 << 20})


def test_out_of_order_bytes_count_against_the_limit_and_the_budget() -> None:
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, max_buffered_bytes=1 << 20)

    async def main() -> list[str]:
        async with serving(config, max_message_bytes=4 << 20) as (server, port):
            async with client(port, config=config) as m:
                # Nothing at offset 0 (no event, type unknown): aioquic holds the rest.
                out = [await reply(raw(m, bytes(10_000), offset=4 << 20))]
                out.append(await reply(raw(m, bytes(10_000), offset=2 << 20)))
                out.append(await honest(port))
                await settle(server)
        return out

    assert asyncio.run(main()) == ["message_too_large", "busy", "ok"]


def test_bytes_held_on_refused_streams_are_bounded_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[bool, str]:
        async with serving() as (server, port), client(port) as m:
            assert await code_of(m.call(msg("hello"), timeout=5)) == "ok"
            conn = next(iter(server._connections))
            assert isinstance(conn, ServerProtocol)
            # A refused stream (tombstone) whose peer ignored STOP_SENDING and kept
            # sending beyond a gap: aioquic holds those bytes for reassembly.
            stream = conn._quic._get_or_create_stream(QuicFrameType.STREAM_BASE, 400)
            tomb = conn.open_inbound(400, 0)
            tomb.aborted = tomb.replied = True
            stream.receiver._buffer = bytearray(CONFIG.flow_control_window_bytes + 1)
            conn.after_datagram()
            await asyncio.sleep(0.2)
            return conn.closed_error is not None or conn._quic._close_event is not None, (
                await honest(port)
            )

    with caplog.at_level(logging.WARNING):
        closed, after = asyncio.run(main())
    assert closed and after == "ok"
    assert "out of order on refused streams" in caplog.text
