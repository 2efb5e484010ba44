"""Upload goodput: mutually authenticated QUIC (ours) versus TLS/TCP and plain aioquic.

Both sides use the same federation certificates and mutual authentication; the
receiver runs in a separate OS process (``spawn``) so sender and receiver do not
share one interpreter's CPU. Goodput = payload bytes / time from the first byte
written until the receiver's (tiny) acknowledgement arrives, in MB/s (10^6 B/s).

Baselines: asyncio TLS 1.3 over TCP (mutual auth), and plain aioquic (its own
asyncio glue, server-authenticated TLS only, the same datagram size and flow
control windows, the whole payload handed to ``send_stream_data`` at once), which
shows what our layer (mTLS hooks, bounded framing, batching) costs or saves.

Run ``python -m secure_xfl.bench.transport [payload_mb [datagram_size ...]]`` for a
markdown table.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from secure_xfl.bench.report import Row, markdown, row
from secure_xfl.crypto import pem, pki
from secure_xfl.transport import RpcClient, RpcServer, TlsIdentity, TransportConfig
from secure_xfl.transport.tcp import TlsRpcClient

__all__ = [
    "ours_tls_goodput", "parallel_quic_goodput", "plain_quic_goodput", "quic_goodput", "run",
    "tls_tcp_goodput",
]  # fmt: skip

_FED = "bench"
_CHUNK = 1 << 20


def _provision(directory: Path) -> None:
    ca, ca_key = pki.create_ca(_FED)
    pem.write_certificate(directory / "ca.pem", ca)
    for role in ("aggregator", "client"):
        cert, key = pki.issue_certificate(ca, ca_key, pki.PeerIdentity(_FED, role, "bench"))
        pem.write_certificate(directory / f"{role}.pem", cert)
        pem.write_private_key(directory / f"{role}.key", key)


def _tls(directory: Path, role: str) -> TlsIdentity:
    return TlsIdentity(
        cert=directory / f"{role}.pem",
        key=directory / f"{role}.key",
        ca_cert=directory / "ca.pem",
        federation=_FED,
    )


def _ssl_context(directory: Path, role: str, *, server: bool) -> ssl.SSLContext:
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    ctx = ssl.create_default_context(purpose, cafile=str(directory / "ca.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(directory / f"{role}.pem", directory / f"{role}.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # identity is the SPIFFE URI, as in the QUIC path
    return ctx


# ---------------------------------------------------------------------------- receivers


def _quic_receiver(
    directory: str, max_datagram_size: int, ports: Any, stop: Any, parallel: int = 0
) -> None:
    async def main() -> None:
        async def sink(_peer: pki.PeerIdentity, payload: bytes) -> bytes:
            return len(payload).to_bytes(8, "big")

        config = TransportConfig(max_datagram_size=max_datagram_size, stream_timeout_s=120)
        server = RpcServer(
            tls=_tls(Path(directory), "aggregator"),
            allowed_roles=["client"],
            handler=sink,
            config=config,
            # Parts need typed requests: an "upload" of up to ``parallel`` bytes. Each part
            # claims half that from the buffer budget while it arrives (the type's limit).
            limits=(lambda t: {"upload": parallel}[t]) if parallel else None,
            parallel_types=("upload",) if parallel else (),
        )
        ports.put(await server.start("127.0.0.1", 0))
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.close()

    asyncio.run(main())


def _parallel_receiver(
    directory: str, max_datagram_size: int, limit: int, ports: Any, stop: Any
) -> None:
    _quic_receiver(directory, max_datagram_size, ports, stop, parallel=limit)


def _plain_quic_configuration(
    directory: Path, max_datagram_size: int, *, is_client: bool
) -> QuicConfiguration:
    window = TransportConfig().flow_control_window_bytes
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["bench"],
        max_datagram_size=max_datagram_size,
        max_data=window,
        max_stream_data=window,
        verify_mode=ssl.CERT_NONE,
    )
    if not is_client:
        config.load_cert_chain(directory / "aggregator.pem", directory / "aggregator.key")
    return config


class _PlainSink(QuicConnectionProtocol):
    """Plain aioquic receiver: counts stream bytes, answers the count at FIN."""

    received = 0

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self.received += len(event.data)
            if event.end_stream:
                self._quic.send_stream_data(
                    event.stream_id, self.received.to_bytes(8, "big"), end_stream=True
                )
                self.transmit()


class _PlainSource(QuicConnectionProtocol):
    reply: asyncio.Future[bytes] | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived) and self.reply is not None:
            if not self.reply.done():
                self.reply.set_result(event.data)


def _plain_quic_receiver(directory: str, max_datagram_size: int, ports: Any, stop: Any) -> None:
    async def main() -> None:
        config = _plain_quic_configuration(Path(directory), max_datagram_size, is_client=False)
        server = await serve("127.0.0.1", 0, configuration=config, create_protocol=_PlainSink)
        sock = server._transport.get_extra_info("socket")  # type: ignore[union-attr]
        ports.put(sock.getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        server.close()

    asyncio.run(main())


async def count_upload(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The bare TLS/TCP baseline's receiver: a length, that many bytes, their count back."""
    size = int.from_bytes(await reader.readexactly(8), "big")
    left = size
    while left:
        data = await reader.read(min(left, _CHUNK))
        if not data:
            break
        left -= len(data)
    writer.write((size - left).to_bytes(8, "big"))
    await writer.drain()
    writer.close()


def _tcp_receiver(directory: str, ports: Any, stop: Any) -> None:
    async def main() -> None:
        ctx = _ssl_context(Path(directory), "aggregator", server=True)
        server = await asyncio.start_server(count_upload, "127.0.0.1", 0, ssl=ctx)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        server.close()

    asyncio.run(main())


def _with_receiver(target: Any, args: tuple[Any, ...], upload: Any) -> float:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    stop = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ports, stop), daemon=True)
    proc.start()
    try:
        port = ports.get(timeout=60)
        return float(asyncio.run(upload(port)))
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# ---------------------------------------------------------------------------- public API


def quic_goodput(payload_bytes: int, max_datagram_size: int) -> float:
    """MB/s of one ``payload_bytes`` upload over secure-xfl mTLS QUIC on loopback."""
    return _ours_goodput(payload_bytes, max_datagram_size, RpcClient)


def ours_tls_goodput(payload_bytes: int) -> float:
    """MB/s of one ``payload_bytes`` upload over secure-xfl's TLS/TCP transport (the same
    server process, its TCP endpoint: the same framing, limits and peer checks)."""
    return _ours_goodput(payload_bytes, 1452, TlsRpcClient)


def parallel_quic_goodput(payload_bytes: int, workers: int, max_datagram_size: int) -> float:
    """MB/s of one upload cut into ``workers`` parts over as many QUIC connections from
    worker processes (``transport/parts.py``), reassembled and verified by one server
    process; the time includes starting the workers."""
    from secure_xfl.transport.parts import parallel_call

    payload = bytes(msgpack.packb({"t": "upload", "b": bytes(payload_bytes)}))
    with tempfile.TemporaryDirectory() as tmp:
        _provision(Path(tmp))

        async def upload(port: int) -> float:
            config = TransportConfig(max_datagram_size=max_datagram_size, stream_timeout_s=120)
            start = time.perf_counter()
            reply = await parallel_call(tls=_tls(Path(tmp), "client"), server_role="aggregator",
                                        host="127.0.0.1", port=port, config=config,
                                        payload=payload, workers=workers)  # fmt: skip
            elapsed = time.perf_counter() - start
            assert int.from_bytes(reply, "big") == len(payload)
            return float(payload_bytes / elapsed / 1e6)

        limit = len(payload) + (1 << 16)
        return _with_receiver(_parallel_receiver, (tmp, max_datagram_size, limit), upload)


def _ours_goodput(payload_bytes: int, max_datagram_size: int, client_cls: Any) -> float:
    payload = bytes(payload_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        _provision(Path(tmp))

        async def upload(port: int) -> float:
            config = TransportConfig(max_datagram_size=max_datagram_size, stream_timeout_s=120)
            async with client_cls(
                tls=_tls(Path(tmp), "client"),
                server_role="aggregator",
                host="127.0.0.1",
                port=port,
                config=config,
            ) as client:
                start = time.perf_counter()
                reply = await client.call(payload)
                elapsed = time.perf_counter() - start
            assert int.from_bytes(reply, "big") == payload_bytes
            return float(payload_bytes / elapsed / 1e6)

        return _with_receiver(_quic_receiver, (tmp, max_datagram_size), upload)


def plain_quic_goodput(payload_bytes: int, max_datagram_size: int) -> float:
    """MB/s of one ``payload_bytes`` upload over plain aioquic (no mTLS, no framing)."""
    payload = bytes(payload_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        _provision(Path(tmp))

        async def upload(port: int) -> float:
            config = _plain_quic_configuration(Path(tmp), max_datagram_size, is_client=True)
            async with connect(
                "127.0.0.1", port, configuration=config, create_protocol=_PlainSource
            ) as client:
                assert isinstance(client, _PlainSource)
                client.reply = asyncio.get_running_loop().create_future()
                start = time.perf_counter()
                stream_id = client._quic.get_next_available_stream_id()
                client._quic.send_stream_data(stream_id, payload, end_stream=True)
                client.transmit()
                reply = await client.reply
                elapsed = time.perf_counter() - start
            assert int.from_bytes(reply, "big") == payload_bytes
            return payload_bytes / elapsed / 1e6

        return _with_receiver(_plain_quic_receiver, (tmp, max_datagram_size), upload)


def tls_tcp_goodput(payload_bytes: int) -> float:
    """MB/s of one ``payload_bytes`` upload over asyncio TLS 1.3 (mutual auth) on TCP."""
    payload = memoryview(bytes(payload_bytes))
    with tempfile.TemporaryDirectory() as tmp:
        _provision(Path(tmp))

        async def upload(port: int) -> float:
            ctx = _ssl_context(Path(tmp), "client", server=False)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            start = time.perf_counter()
            writer.write(payload_bytes.to_bytes(8, "big"))
            for offset in range(0, payload_bytes, _CHUNK):
                writer.write(payload[offset : offset + _CHUNK])
                await writer.drain()
            received = int.from_bytes(await reader.readexactly(8), "big")
            elapsed = time.perf_counter() - start
            writer.close()
            assert received == payload_bytes
            return payload_bytes / elapsed / 1e6

        return _with_receiver(_tcp_receiver, (tmp,), upload)


def run(
    payload_mb: int = 100,
    datagram_sizes: tuple[int, ...] = (1200, 1452, 9000, 16384),
    *,
    plain: bool = True,
) -> list[Row]:
    """Per datagram size: QUIC goodput vs TLS/TCP and (``plain``) vs plain aioquic."""
    payload_bytes = payload_mb * 1_000_000
    baseline = tls_tcp_goodput(payload_bytes)
    rows: list[Row] = [
        row(f"upload goodput, {payload_mb} MB [secure-xfl TLS/TCP vs TLS/TCP]", "MB/s",
            ours_tls_goodput(payload_bytes), baseline),
    ]  # fmt: skip
    single = quic_goodput(payload_bytes, 1452)
    for workers in (2, 4):
        rows.append(row(f"upload goodput, {payload_mb} MB, datagram 1452 B [parallel QUIC, "
                        f"{workers} workers vs 1 connection]", "MB/s",
                        parallel_quic_goodput(payload_bytes, workers, 1452), single))  # fmt: skip
    for size in datagram_sizes:
        ours = quic_goodput(payload_bytes, size)
        name = f"upload goodput, {payload_mb} MB, datagram {size} B"
        rows.append(row(f"{name} [QUIC mTLS vs TLS/TCP]", "MB/s", ours, baseline))
        if plain:
            rows.append(
                row(
                    f"{name} [QUIC mTLS vs plain aioquic]",
                    "MB/s",
                    ours,
                    plain_quic_goodput(payload_bytes, size),
                )
            )
    return rows


if __name__ == "__main__":
    _args = [int(a) for a in sys.argv[1:]]
    _sizes = tuple(_args[1:]) or (1200, 1452, 9000, 16384)
    print(markdown(run(_args[0] if _args else 100, _sizes)))
