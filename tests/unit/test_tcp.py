"""The TLS 1.3/TCP transport on its own (real sockets on 127.0.0.1, real certificates):
round trips, issue 9's bounds (per-type limits before the body is read, the buffer
budget, connections per peer, slow and idle peers, garbage instead of TLS), typed
handler errors, and ``dial``'s choice of transport, fallback included."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import msgpack
import pytest

from secure_xfl.crypto import pki
from secure_xfl.errors import SecureXFLError
from secure_xfl.transport import (
    HandshakeFailed,
    RemoteError,
    RpcClient,
    RpcServer,
    TlsIdentity,
    TooManyConnections,
    TransportConfig,
)
from secure_xfl.transport.dial import dial
from secure_xfl.transport.framing import decode_response
from secure_xfl.transport.limits import PREFIX_BYTES, BufferBudget
from secure_xfl.transport.tcp import TlsRpcClient, TlsRpcServer
from tests.rpc_harness import Harness, call_once_a_slot_frees

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
HARNESS = Harness("fed-tcp")
_IDS: dict[str, TlsIdentity] = {}
CONFIG = TransportConfig(
    handshake_timeout_s=3, idle_timeout_s=10, stream_timeout_s=3, max_connections_per_peer=8
)
LIMITS = {"hello": 1024, "upload": 400_000}
MAX_MESSAGE = 8 << 20


def identity(name: str, role: str = "client") -> TlsIdentity:
    if name not in _IDS:
        _IDS[name] = HARNESS.identity(role, name)
    return _IDS[name]


def msg(msg_type: str, **fields: object) -> bytes:
    return bytes(msgpack.packb({"t": msg_type, "v": 1, **fields}, use_bin_type=True))


class Refused(SecureXFLError):
    """A typed refusal a handler may raise."""

    code = "not_now"


class Handler:
    """Echo; ``{"t": "hello", "fail": "typed" | "crash"}`` raises instead."""

    def __init__(self) -> None:
        self.calls: list[pki.PeerIdentity] = []

    async def __call__(self, peer: pki.PeerIdentity, payload: bytes) -> bytes:
        self.calls.append(peer)
        if payload.startswith(b"\x83"):  # only the 3-key test messages can fail
            fail = msgpack.unpackb(payload).get("fail")
            if fail == "typed":
                raise Refused("come back later")
            if fail == "crash":
                raise ValueError("a bug in the handler")
        return payload


@contextlib.asynccontextmanager
async def serving(
    config: TransportConfig = CONFIG, budget: int = 256 << 20
) -> AsyncIterator[tuple[TlsRpcServer, int, Handler]]:
    handler = Handler()
    server = TlsRpcServer(
        tls=identity("agg", "aggregator"),
        allowed_roles=["client"],
        handler=handler,
        config=config,
        max_message_bytes=MAX_MESSAGE,
        limit_for=LIMITS.get,
        budget=BufferBudget(budget),
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port, handler
    finally:
        await server.close()


def client(port: int, name: str = "mallory", config: TransportConfig = CONFIG) -> TlsRpcClient:
    return TlsRpcClient(
        tls=identity(name), server_role="aggregator", host="127.0.0.1", port=port, config=config
    )


async def honest(port: int) -> str:
    """A fresh honest client: 'ok' or the refusal code."""
    async with client(port, "honest") as c:
        return await outcome(c.call(msg("hello"), timeout=5))


async def outcome(call: object) -> str:
    try:
        await call  # type: ignore[misc]
        return "ok"
    except RemoteError as exc:
        return exc.code


async def send_raw(c: TlsRpcClient, data: bytes) -> None:
    """Bytes on the connection's TLS stream, bypassing the client's framing."""
    assert c._writer is not None
    c._writer.write(data)
    await c._writer.drain()


async def answer_of(c: TlsRpcClient, timeout: float = 5.0) -> str:
    """The server's next reply frame: 'ok', its error code, or 'closed'."""
    assert c._reader is not None
    try:
        async with asyncio.timeout(timeout):
            n = int.from_bytes(await c._reader.readexactly(8), "big")
            data = await c._reader.readexactly(n)
    except asyncio.IncompleteReadError:
        return "closed"
    try:
        decode_response(data)
    except RemoteError as exc:
        return exc.code
    return "ok"


async def closed_after(c: TlsRpcClient, timeout: float = 10.0) -> float:
    """Seconds until the server closes the connection (EOF on our side)."""
    assert c._reader is not None
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while await c._reader.read(1 << 16):
            pass
    return time.monotonic() - start


async def settle(server: TlsRpcServer, used: int = 0, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.budget.used != used and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.budget.used == used


def upload_head(size: int) -> bytes:
    """The first PREFIX_BYTES (what the server reads to learn the type) of an upload
    whose bin field declares ``size`` bytes."""
    full = msg("upload", round=0, update=b"\0" * 16)
    head = full[: full.index(b"\xc4\x10")] + b"\xc6" + size.to_bytes(4, "big")
    return (head + bytes(PREFIX_BYTES))[:PREFIX_BYTES]


def header(n: int) -> bytes:
    return n.to_bytes(8, "big")


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


# ----------------------------------------------------------------------------- round trip


def test_honest_calls_round_trip_and_identities_are_verified() -> None:
    async def main() -> None:
        async with serving() as (_server, port, handler), client(port, "alice") as c:
            assert c.server_identity == pki.PeerIdentity("fed-tcp", "aggregator", "agg")
            assert await c.call(msg("hello"), timeout=5) == msg("hello")
            big = msg("upload", update=bytes(range(256)) * 1500)  # 384 kB: many TLS records
            assert await c.call(big, timeout=10) == big
            assert handler.calls == [pki.PeerIdentity("fed-tcp", "client", "alice")] * 2
        assert c.closed

    run(main)


# ------------------------------------------------------------------------ per-type limits


def test_a_declared_length_over_the_type_limit_is_refused_before_the_body() -> None:
    """Only the header and the type prefix are ever sent: a server that waited for the
    declared body would time out, not answer ``message_too_large``."""

    async def main() -> list[str]:
        out = []
        async with serving() as (server, port, handler):
            for declared in (5_000_000, 10**12):  # over the upload limit; over max_message
                async with client(port) as c:
                    await send_raw(c, header(declared) + upload_head(min(declared - 30, 1 << 31)))
                    out.append(await answer_of(c, timeout=2))
                    out.append(await answer_of(c, timeout=2))  # then the server hangs up
            async with client(port) as c:  # hello's limit is 1024
                await send_raw(c, header(2000) + msg("hello", pad=bytes(2000))[:64])
                out.append(await answer_of(c, timeout=2))
            await settle(server)
            assert handler.calls == []
            out.append(await honest(port))
        return out

    assert run(main) == [*["message_too_large", "closed"] * 2, "message_too_large", "ok"]


def test_unknown_type_and_garbage_prefix_are_refused_protocol() -> None:
    async def main() -> list[str]:
        out = []
        async with serving() as (server, port, handler):
            for data in (msg("decrypt", x=bytes(5000)), b"\x00" * 100, msg("hello")[:3]):
                async with client(port) as c:
                    await send_raw(c, header(len(data)) + data)
                    out.append(await answer_of(c))
            assert handler.calls == []
            await settle(server)
            out.append(await honest(port))
        return out

    assert run(main) == ["protocol"] * 3 + ["ok"]


# ------------------------------------------------------------------- budget and connections


def test_buffer_budget_refuses_busy_and_releases_claims() -> None:
    async def main() -> list[str]:
        out = []
        async with serving(budget=1 << 20) as (server, port, _handler):
            held = [client(port) for _ in range(2)]
            for c in held:  # two stalled uploads claim 800 kB of the 1 MiB budget
                await c.connect()
                await send_raw(c, header(400_000) + upload_head(399_970))
            await settle(server, 800_000)
            async with client(port) as c:
                await send_raw(c, header(400_000) + upload_head(399_970))
                out.append(await answer_of(c))
            out.append(await honest(port))  # a small request still fits
            for c in held:
                await c.close()
            await settle(server)  # a dropped connection releases its claim
            async with client(port) as c:
                out.append(await outcome(c.call(msg("upload", update=bytes(399_000)), timeout=10)))
            await settle(server)
        return out

    assert run(main) == ["busy", "ok", "ok"]


def test_connections_beyond_max_connections_per_peer_are_refused() -> None:
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, max_connections_per_peer=2)

    async def main() -> list[str]:
        out = []
        async with serving(config) as (_server, port, _handler):
            first, second = client(port, config=config), client(port, config=config)
            await first.connect()
            await second.connect()
            try:
                with pytest.raises(TooManyConnections) as info:
                    await client(port, config=config).connect()
                out.append(info.value.code)
                out.append(await honest(port))  # another identity is not affected
                out.append(await outcome(second.call(msg("hello"), timeout=5)))
                await first.close()
                again = lambda: client(port, config=config)  # noqa: E731
                out.append(await call_once_a_slot_frees(again, msg("hello"), outcome))
            finally:
                await second.close()
        return out

    assert run(main) == ["too_many_connections", "ok", "ok", "ok"]


@pytest.mark.parametrize("first", ["quic", "tls"])
def test_the_per_peer_cap_counts_both_transports(first: str) -> None:
    """A peer at its cap on one transport is refused on the other: the cap is per peer,
    not per transport (or a client could hold twice ``max_connections_per_peer``)."""
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, max_connections_per_peer=2)
    kinds = {"quic": RpcClient, "tls": TlsRpcClient}
    other = "tls" if first == "quic" else "quic"

    def make(kind: str, name: str = "mallory") -> Any:
        return kinds[kind](tls=identity(name), server_role="aggregator", host="127.0.0.1",
                           port=port, config=config)  # fmt: skip

    async def main() -> list[str]:
        nonlocal port
        server = RpcServer(tls=identity("agg", "aggregator"), allowed_roles=["client"],
                           handler=Handler(), config=config)  # fmt: skip
        port = await server.start("127.0.0.1", 0)
        held = [make(first), make(first)]
        out: list[str] = []
        try:
            for c in held:
                await c.connect()
            with pytest.raises(TooManyConnections) as info:
                await make(other).connect()
            out.append(info.value.code)
            async with make(other, "alice") as c:  # another identity is not affected
                out.append(await outcome(c.call(msg("hello"), timeout=5)))
            await held.pop().close()
            out.append(await call_once_a_slot_frees(lambda: make(other), msg("hello"), outcome))
        finally:
            for c in held:
                await c.close()
            await server.close()
        return out

    port = 0
    assert run(main) == ["too_many_connections", "ok", "ok"]


# --------------------------------------------------------------------- slow and idle peers


def test_a_peer_that_stalls_after_the_header_is_dropped_in_time() -> None:
    config = TransportConfig(
        handshake_timeout_s=3, stream_timeout_s=0.5, min_request_rate_bytes_s=1000
    )

    async def main() -> tuple[float, str]:
        async with serving(config) as (server, port, handler):
            async with client(port, config=config) as c:
                await send_raw(c, header(500))  # allowed 0.5 + 500/1000 = 1.0 s in all
                took = await closed_after(c)
            await settle(server)
            assert handler.calls == []
            return took, await honest(port)

    took, after = run(main)
    assert 0.9 <= took < 2.5, took
    assert after == "ok"


def test_an_idle_connection_is_closed_after_idle_timeout() -> None:
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, idle_timeout_s=0.5)

    async def main() -> tuple[float, str]:
        async with serving(config) as (_server, port, _handler):
            async with client(port, config=config) as c:
                assert await c.call(msg("hello"), timeout=5)
                took = await closed_after(c)
            return took, await honest(port)

    took, after = run(main)
    assert 0.4 <= took < 2.0, took
    assert after == "ok"


def test_garbage_or_silence_instead_of_a_client_hello_does_not_hurt_the_server() -> None:
    config = TransportConfig(handshake_timeout_s=0.5, stream_timeout_s=3)

    async def main() -> list[str]:
        out = []
        async with serving(config) as (_server, port, handler):
            for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(5000), b"\x16\x03\x01\xff"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(junk)
                async with asyncio.timeout(5):  # an alert maybe, then the close
                    while await reader.read(1 << 16):
                        pass
                writer.close()
                out.append(await honest(port))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            async with asyncio.timeout(5):  # silent: dropped at handshake_timeout_s
                assert await reader.read() == b""
            out.append(f"silent closed {time.monotonic() - start < 2}")
            writer.close()
            assert len(handler.calls) == 3
        return out

    assert run(main) == ["ok", "ok", "ok", "silent closed True"]


# ------------------------------------------------------------------------- handler errors


def test_handler_errors_are_typed_and_the_connection_keeps_serving() -> None:
    async def main() -> list[str]:
        async with serving() as (_server, port, _handler), client(port) as c:
            out = [await outcome(c.call(msg("hello", fail="typed"), timeout=5))]
            out.append(await outcome(c.call(msg("hello"), timeout=5)))
            out.append(await outcome(c.call(msg("hello", fail="crash"), timeout=5)))
            out.append(await outcome(c.call(msg("hello"), timeout=5)))
            assert not c.closed
            return out

    assert run(main) == ["not_now", "ok", "internal", "ok"]


# ----------------------------------------------------------------------------------- dial


async def _rpc_server() -> tuple[RpcServer, Handler]:
    handler = Handler()
    server = RpcServer(
        tls=identity("agg", "aggregator"), allowed_roles=["client"], handler=handler, config=CONFIG
    )
    return server, handler


@pytest.mark.parametrize(
    ("protocol", "prefer", "want"),
    [("tls", "tls", TlsRpcClient), ("quic", "tls", RpcClient), ("auto", "tls", TlsRpcClient),
     ("auto", "quic", RpcClient)],
)  # fmt: skip
def test_dial_picks_the_configured_transport(protocol: str, prefer: str, want: type) -> None:
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, protocol=protocol,  # type: ignore[arg-type]
                             prefer=prefer)  # type: ignore[arg-type]  # fmt: skip

    async def main() -> None:
        server, _handler = await _rpc_server()
        port = await server.start("127.0.0.1", 0)
        try:
            c = await dial(tls=identity("alice"), server_role="aggregator", host="127.0.0.1",
                           port=port, config=config, timeout=5)  # fmt: skip
            try:
                assert type(c) is want
                assert await c.call(msg("hello"), timeout=5) == msg("hello")
            finally:
                await c.close()
        finally:
            await server.close()

    run(main)


def test_auto_falls_back_to_tls_when_no_quic_handshake_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a TlsRpcServer listens: QUIC datagrams to that port go unanswered."""
    config = TransportConfig(
        handshake_timeout_s=3, stream_timeout_s=3, protocol="auto", prefer="quic",
        fallback_after_s=0.5,
    )  # fmt: skip

    async def main() -> float:
        async with serving() as (_server, port, handler):
            start = time.monotonic()
            c = await dial(tls=identity("alice"), server_role="aggregator", host="127.0.0.1",
                           port=port, config=config, timeout=10)  # fmt: skip
            took = time.monotonic() - start
            try:
                assert isinstance(c, TlsRpcClient)
                assert await c.call(msg("hello"), timeout=5) == msg("hello")
            finally:
                await c.close()
            assert len(handler.calls) == 1
        return took

    with caplog.at_level(logging.WARNING, logger="secure_xfl.transport.dial"):
        took = run(main)
    assert "falling back to TLS/TCP" in caplog.text
    assert took < 3.0, took  # about fallback_after_s, not the 10 s dial timeout


def test_auto_falls_back_to_quic_when_tcp_does_not_connect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default order (TLS/TCP first): a server whose TCP endpoint is gone is reached
    over QUIC, with the fallback logged."""
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, protocol="auto",
                             fallback_after_s=0.5)  # fmt: skip

    async def main() -> None:
        server, handler = await _rpc_server()
        port = await server.start("127.0.0.1", 0)
        assert server.tcp is not None
        await server.tcp.close()  # only QUIC answers now
        try:
            c = await dial(tls=identity("alice"), server_role="aggregator", host="127.0.0.1",
                           port=port, config=config, timeout=10)  # fmt: skip
            try:
                assert isinstance(c, RpcClient)
                assert await c.call(msg("hello"), timeout=5) == msg("hello")
            finally:
                await c.close()
            assert len(handler.calls) == 1
        finally:
            await server.close()

    with caplog.at_level(logging.WARNING, logger="secure_xfl.transport.dial"):
        run(main)
    assert "no TLS/TCP handshake" in caplog.text and "falling back to QUIC" in caplog.text


def test_auto_does_not_fall_back_when_quic_refuses_the_certificate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusal is not unreachability: the other transport would refuse alike, so it is
    not tried (here QUIC first, refused; TLS/TCP never sees a handshake)."""
    config = TransportConfig(handshake_timeout_s=3, stream_timeout_s=3, protocol="auto",
                             prefer="quic")  # fmt: skip
    keyholder = identity("kh", "keyholder")  # the wrong role for an aggregator endpoint

    async def main() -> HandshakeFailed:
        server, handler = await _rpc_server()
        port = await server.start("127.0.0.1", 0)
        try:
            with pytest.raises(HandshakeFailed) as info:
                await dial(tls=keyholder, server_role="aggregator", host="127.0.0.1",
                           port=port, config=config, timeout=5)  # fmt: skip
            assert handler.calls == []
        finally:
            await server.close()
        return info.value

    with caplog.at_level(logging.INFO):
        exc = run(main)
    assert isinstance(exc, HandshakeFailed) and exc.refusal is not None, exc
    assert not isinstance(exc, TooManyConnections)
    assert "falling back" not in caplog.text
    assert "TLS/TCP peer" not in caplog.text  # the TCP endpoint never saw a handshake
