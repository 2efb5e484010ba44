"""RPC over mutually authenticated QUIC: framing, limits, errors, timeouts, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from secure_xfl.crypto import pki
from secure_xfl.errors import CryptoError
from secure_xfl.transport import (
    RemoteError,
    RpcClient,
    StreamReset,
    TransportConfig,
)
from secure_xfl.transport.streams import ERR_TIMEOUT
from tests.rpc_harness import Harness

pytestmark = pytest.mark.timeout(60)
FED = "fed-rpc"
CONFIG = TransportConfig(handshake_timeout_s=3, idle_timeout_s=10, stream_timeout_s=5)
HARNESS = Harness(FED)
identity = HARNESS.identity


class Refused(CryptoError):
    code = "refused_for_test"


async def handler(peer: pki.PeerIdentity, payload: bytes) -> bytes:
    if payload == b"refuse":
        raise Refused("policy says no")
    if payload == b"crash":
        raise ZeroDivisionError("boom")
    if payload.startswith(b"sleep"):
        await asyncio.sleep(float(payload[5:]))
    return payload


def serve(
    body: Callable[[int, Callable[[], RpcClient]], Awaitable[None]],
    *,
    config: TransportConfig = CONFIG,
    max_message_bytes: int | None = None,
) -> None:
    HARNESS.serve(handler, body, config=config, max_message_bytes=max_message_bytes)


def test_echo_round_trip_and_5mb_payload() -> None:
    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            assert await c.call(b"hello") == b"hello"
            assert await c.call(b"") == b""
            big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
            assert await c.call(big, timeout=30) == big

    serve(body)


def test_error_reply_carries_code() -> None:
    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            with pytest.raises(RemoteError) as info:
                await c.call(b"refuse")
            assert info.value.code == "refused_for_test"
            assert "policy says no" in info.value.message
            assert await c.call(b"after") == b"after"

    serve(body)


def test_handler_crash_is_internal_error_and_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            with pytest.raises(RemoteError) as info:
                await c.call(b"crash")
            assert info.value.code == "internal"
            assert "boom" not in info.value.message  # no internals leak to the peer
            assert await c.call(b"still here") == b"still here"

    serve(body)
    crash_logs = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert crash_logs and crash_logs[0].exc_info is not None
    assert "spiffe://fed-rpc/client/c1" in crash_logs[0].getMessage()


def test_oversized_request_rejected_and_next_request_served() -> None:
    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            with pytest.raises((RemoteError, StreamReset)) as info:
                await c.call(bytes(3_000_000), timeout=10)
            if isinstance(info.value, RemoteError):
                assert info.value.code == "message_too_large"
            assert await c.call(bytes(1000)) == bytes(1000)

    serve(body, max_message_bytes=1_000_000)


def test_stalled_stream_is_reset() -> None:
    config = TransportConfig(handshake_timeout_s=3, idle_timeout_s=10, stream_timeout_s=0.5)

    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            protocol = c._protocol
            assert protocol is not None
            # Start a request and never finish it: the server must reset the stream.
            stream_id = protocol._quic.get_next_available_stream_id()
            state = protocol.open_inbound(stream_id, 1000)
            state.watched = False  # only the server side should time this out
            protocol._quic.send_stream_data(stream_id, b"partial request")
            protocol.transmit()
            assert state.done is not None
            with pytest.raises(StreamReset) as info:
                await asyncio.wait_for(state.done, 5)
            assert info.value.error_code == ERR_TIMEOUT
            assert await c.call(b"next") == b"next"

    serve(body, config=config)


def test_call_timeout_and_slow_handler() -> None:
    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            from secure_xfl.transport import CallTimeout

            with pytest.raises(CallTimeout):
                await c.call(b"sleep2", timeout=0.2)
            # A handler slower than stream_timeout_s is not a stalled stream.
            assert await c.call(b"sleep0.3") == b"sleep0.3"

    serve(body)


def test_many_concurrent_streams_and_connections() -> None:
    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        clients = [client() for _ in range(4)]
        await asyncio.gather(*(c.connect() for c in clients))
        try:
            payloads = [f"req-{i}".encode() * (i + 1) for i in range(40)]
            results = await asyncio.gather(
                *(clients[i % 4].call(p, timeout=20) for i, p in enumerate(payloads))
            )
            assert results == payloads
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    serve(body)


def test_reply_over_client_limit_is_refused() -> None:
    small = TransportConfig(
        handshake_timeout_s=3, idle_timeout_s=10, stream_timeout_s=5, max_message_bytes=100_000
    )

    async def body(port: int, client: Callable[[], RpcClient]) -> None:
        async with RpcClient(
            tls=identity("client", "c2"),
            server_role="aggregator",
            host="127.0.0.1",
            port=port,
            config=small,
        ) as c:
            from secure_xfl.transport import MessageTooLarge

            with pytest.raises(MessageTooLarge):
                await c.call(bytes(90_000) + bytes(20_000), timeout=10)

    serve(body, max_message_bytes=10_000_000)


def test_a_dead_server_is_noticed_at_once_not_at_the_timeouts() -> None:
    """Nothing listening: the connected client socket hears ICMP port unreachable and
    gives up in well under ``handshake_timeout_s`` (a killed or restarting server is
    then retried by the caller's backoff within seconds, not after the idle timeout)."""
    import socket
    import time

    from secure_xfl.transport import HandshakeFailed

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])  # closed again below: nothing listens there

    async def main() -> float:
        client = RpcClient(
            tls=identity("client", "c1"),
            server_role="aggregator",
            host="127.0.0.1",
            port=port,
            config=TransportConfig(handshake_timeout_s=20, idle_timeout_s=30),
        )
        start = time.monotonic()
        with pytest.raises(HandshakeFailed) as err:
            await client.connect()
        assert err.value.refusal is None  # transient: retried by the caller
        return time.monotonic() - start

    assert asyncio.run(main()) < 5.0


def test_a_server_that_dies_mid_connection_is_noticed_within_seconds() -> None:
    """The server's socket vanishes without a CONNECTION_CLOSE (as when its process is
    SIGKILLed): the client's next call fails in seconds with ConnectionClosed (ICMP port
    unreachable), not after the 30 s idle timeout."""
    import time

    from secure_xfl.transport import ConnectionClosed, RpcServer

    config = TransportConfig(handshake_timeout_s=5, idle_timeout_s=30, stream_timeout_s=30)

    async def main() -> float:
        server = RpcServer(
            tls=identity("aggregator", "agg"),
            allowed_roles=["client"],
            handler=handler,
            config=config,
        )
        port = await server.start("127.0.0.1", 0)
        client = RpcClient(tls=identity("client", "c1"), server_role="aggregator",
                           host="127.0.0.1", port=port, config=config)  # fmt: skip
        await client.connect()
        assert await client.call(b"ping") == b"ping"
        quic_server = server._server
        assert quic_server is not None
        quic_server.udp.close()  # type: ignore[attr-defined]  # the batcher's duplicate
        quic_server._transport.abort()  # type: ignore[union-attr]  # no CONNECTION_CLOSE
        start = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await client.call(b"sleep0.1", timeout=25)
        took = time.monotonic() - start
        await client.close()
        return took

    assert asyncio.run(main()) < 5.0


def test_a_server_that_dies_while_a_call_waits_is_noticed_within_seconds() -> None:
    """The request was delivered and the client only waits (nothing of its own in
    flight): its probes still hear the ICMP unreachable of the vanished server."""
    import time

    from secure_xfl.transport import ConnectionClosed, RpcServer

    config = TransportConfig(handshake_timeout_s=5, idle_timeout_s=30, stream_timeout_s=30)

    async def main() -> float:
        server = RpcServer(tls=identity("aggregator", "agg"), allowed_roles=["client"],
                           handler=handler, config=config)  # fmt: skip
        port = await server.start("127.0.0.1", 0)
        client = RpcClient(tls=identity("client", "c1"), server_role="aggregator",
                           host="127.0.0.1", port=port, config=config)  # fmt: skip
        await client.connect()
        call = asyncio.ensure_future(client.call(b"sleep20", timeout=25))
        await asyncio.sleep(0.5)  # delivered; the handler sleeps
        quic_server = server._server
        assert quic_server is not None
        quic_server.udp.close()  # type: ignore[attr-defined]
        quic_server._transport.abort()  # type: ignore[union-attr]
        start = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await call
        took = time.monotonic() - start
        await client.close()
        return took

    assert asyncio.run(main()) < 5.0


def test_a_server_replaced_on_the_same_port_is_noticed_after_peer_silence() -> None:
    """The server dies and a successor binds its port at once (no ICMP ever comes, and
    the successor drops packets of connections it never had): a waiting call fails
    after ``peer_silence_s`` of silence, not after the idle timeout."""
    import time

    from secure_xfl.transport import ConnectionClosed, RpcServer

    config = TransportConfig(
        handshake_timeout_s=5, idle_timeout_s=60, stream_timeout_s=60, peer_silence_s=3
    )

    def server() -> RpcServer:
        return RpcServer(tls=identity("aggregator", "agg"), allowed_roles=["client"],
                         handler=handler, config=config)  # fmt: skip

    async def main() -> float:
        first = server()
        port = await first.start("127.0.0.1", 0)
        client = RpcClient(tls=identity("client", "c1"), server_role="aggregator",
                           host="127.0.0.1", port=port, config=config)  # fmt: skip
        await client.connect()
        call = asyncio.ensure_future(client.call(b"sleep30", timeout=50))
        await asyncio.sleep(0.5)
        quic_server = first._server
        assert quic_server is not None
        quic_server.udp.close()  # type: ignore[attr-defined]
        quic_server._transport.abort()  # type: ignore[union-attr]
        assert first.tcp is not None
        await first.tcp.close()  # the whole process died: its TCP endpoint too
        await asyncio.sleep(0.05)  # abort() closes the socket on the next loop turn
        successor = server()
        await successor.start("127.0.0.1", port)
        start = time.monotonic()
        with pytest.raises(ConnectionClosed, match="silent"):
            await call
        took = time.monotonic() - start
        await client.close()
        await successor.close()
        return took

    assert asyncio.run(main()) < 8.0
