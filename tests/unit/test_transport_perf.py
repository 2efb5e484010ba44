"""Bulk uploads over mTLS QUIC: large datagrams, batching/GSO, integrity, no stalls."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from secure_xfl.crypto import pki
from secure_xfl.errors import ConfigError
from secure_xfl.transport import RpcClient, TransportConfig
from secure_xfl.transport import udp as udp_module
from secure_xfl.transport.config import MAX_DATAGRAM_SIZE
from tests.rpc_harness import Harness

pytestmark = pytest.mark.timeout(120)
FED = "fed-perf"
HARNESS = Harness(FED)
#: Generous wall-clock bound for a few MB on a loaded 2-core machine (the stall this
#: guards against made no progress at all until the 60 s stream timeout).
BOUND_S = 30.0


async def digest(_peer: pki.PeerIdentity, payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "big")


def serve(
    config: TransportConfig, body: Callable[[Callable[[], RpcClient]], Awaitable[None]]
) -> None:
    async def with_client(_port: int, client: Callable[[], RpcClient]) -> None:
        await body(client)

    HARNESS.serve(digest, with_client, config=config)


async def upload(client: RpcClient, payload: bytes) -> None:
    reply = await client.call(payload)
    assert reply == hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "big")


@pytest.mark.parametrize("size", [32_000, 65_000, MAX_DATAGRAM_SIZE + 1])
def test_datagrams_aioquic_cannot_frame_are_refused(size: int) -> None:
    # aioquic 1.7 encodes STREAM frame lengths in 2 bytes (max 16383): at 32,000-byte
    # datagrams an all-zero upload stalled until the stream timeout (the cut-off
    # frame tail parsed as PADDING and was acknowledged), at 65,000 the peer closed
    # the connection with "Failed to parse frame".
    with pytest.raises(ConfigError, match="max_datagram_size"):
        TransportConfig(max_datagram_size=size)


@pytest.mark.parametrize("size", [1200, 9000, MAX_DATAGRAM_SIZE])
@pytest.mark.parametrize("pattern", ["zeros", "random"])
def test_multi_megabyte_upload_arrives_intact_and_promptly(size: int, pattern: str) -> None:
    # Zeros reproduce the silent stall (a mis-framed tail parses as PADDING); random
    # bytes would turn mis-framing into a connection error instead.
    mb = 4 if size > 1452 else 2
    payload = bytes(mb << 20) if pattern == "zeros" else os.urandom(mb << 20)
    config = TransportConfig(max_datagram_size=size, stream_timeout_s=BOUND_S)

    async def body(client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            started = time.monotonic()
            async with asyncio.timeout(BOUND_S):
                await upload(c, payload)
            assert time.monotonic() - started < BOUND_S

    serve(config, body)


def test_concurrent_clients_share_the_batching_server_socket() -> None:
    # The server drains its one UDP socket in batches; every datagram must still be
    # routed to its own connection by connection id.
    config = TransportConfig(max_datagram_size=9000, stream_timeout_s=BOUND_S)
    payloads = [os.urandom(1 << 20) + bytes([i]) for i in range(3)]

    async def body(client: Callable[[], RpcClient]) -> None:
        clients = [client() for _ in payloads]
        for c in clients:
            await c.connect()
        try:
            async with asyncio.timeout(BOUND_S):
                await asyncio.gather(
                    *(upload(c, p) for c, p in zip(clients, payloads, strict=True)),
                    *(upload(clients[0], b"small %d" % i) for i in range(5)),
                )
        finally:
            for c in clients:
                await c.close()

    serve(config, body)


def test_upload_without_gso_falls_back_to_sendto(monkeypatch: pytest.MonkeyPatch) -> None:
    original_init = udp_module.UdpBatcher.__init__

    def no_gso(self: udp_module.UdpBatcher, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self._gso = False

    monkeypatch.setattr(udp_module.UdpBatcher, "__init__", no_gso)
    payload = os.urandom(2 << 20)

    async def body(client: Callable[[], RpcClient]) -> None:
        async with client() as c:
            async with asyncio.timeout(BOUND_S):
                await upload(c, payload)

    serve(TransportConfig(max_datagram_size=9000, stream_timeout_s=BOUND_S), body)


def test_client_close_releases_its_duplicate_socket() -> None:
    async def body(client: Callable[[], RpcClient]) -> None:
        c = client()
        await c.connect()
        protocol = c._protocol
        assert protocol is not None and protocol.udp is not None
        await upload(c, b"x")
        await c.close()
        assert protocol.udp._sock is None

    serve(TransportConfig(), body)
