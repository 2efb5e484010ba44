"""Request/response RPC over mutually authenticated QUIC, one request per stream.

Framing (see docs/transport.md): the request is the client's bytes on a fresh
bidirectional stream up to FIN; the response is one status byte (0 ok, 1 error)
followed by the body, then FIN. An error body is msgpack ``{"code", "message"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Collection
from types import TracebackType
from typing import Any, cast

from aioquic import tls
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from secure_xfl.crypto.pki import REJECT_REASONS, PeerIdentity
from secure_xfl.transport import mtls
from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.errors import (
    CallTimeout,
    ConnectionClosed,
    HandshakeFailed,
    TooManyConnections,
    TransportError,
)
from secure_xfl.transport.framing import STATUS_ERROR, STATUS_OK, decode_response, encode_error
from secure_xfl.transport.limits import BufferBudget, Limits
from secure_xfl.transport.parts import PART_TYPE, Reassembler
from secure_xfl.transport.server import BatchingQuicServer, ServerProtocol, quic_connections_of
from secure_xfl.transport.streams import ERR_BUSY, ERR_CANCELLED, MessageProtocol
from secure_xfl.transport.tcp import TlsRpcServer
from secure_xfl.transport.udp import UdpBatcher

__all__ = [
    "STATUS_ERROR",
    "STATUS_OK",
    "Handler",
    "RpcClient",
    "RpcServer",
    "decode_response",
    "encode_error",
]

Handler = Callable[[PeerIdentity, bytes], Awaitable[bytes]]

server_log = logging.getLogger("secure_xfl.transport.rpc.server")
client_log = logging.getLogger("secure_xfl.transport.rpc.client")


class RpcServer:
    """mTLS QUIC server: each verified request stream is answered by ``handler``.

    ``limits`` (message type -> largest request in bytes; ``KeyError`` or 0 for a type
    the endpoint refuses) turns on per-type limits: the type is peeked from each
    request's first bytes and its limit (capped by ``max_message_bytes``) applies as
    the bytes arrive. Without it every request may reach ``max_message_bytes``.
    Memory per peer and server-wide is bounded as described in ``server.py``.
    """

    def __init__(
        self,
        *,
        tls: TlsIdentity,
        allowed_roles: Collection[str],
        handler: Handler,
        config: TransportConfig = TransportConfig(),  # noqa: B008 - frozen, immutable
        max_message_bytes: int | None = None,
        limits: Limits | None = None,
        parallel_types: Collection[str] = (),
    ) -> None:
        mtls.check_aioquic()
        self.tls = tls
        self.config = config
        self.parallel_types = frozenset(parallel_types)
        """Request types a client may send in parts over several connections
        (:mod:`.parts`); the reassembled request is bounded by its own type's limit."""
        self.handler: Handler = handler
        self.max_message_bytes = max_message_bytes or config.max_message_bytes
        self.limits = limits
        self.budget = BufferBudget(config.max_buffered_bytes)
        """Bytes claimed by requests being received or handled (all connections)."""
        self._crl = tls.load_crl()
        self._policy = mtls.make_policy(tls, allowed_roles, lambda: self._crl)
        self._quic_config = mtls.build_quic_configuration(tls, config, is_client=False)
        self._server: QuicServer | None = None
        self._connections: set[ServerProtocol] = set()
        if self.parallel_types:  # parts share the server-wide buffer budget
            self.handler = Reassembler(
                handler, limit_for=self._inner_limit, max_total=self._parallel_limit,
                budget=self.budget, timeout_s=config.stream_timeout_s + config.idle_timeout_s,
            )  # fmt: skip
        self.tcp: TlsRpcServer | None = None
        """The TLS/TCP endpoint beside the QUIC one (same port number, same checks)."""

    def _inner_limit(self, msg_type: str) -> int | None:
        return self.limit_for(msg_type) if msg_type in self.parallel_types else None

    def _parallel_limit(self) -> int:
        return max((self.limit_for(t) or 0) for t in self.parallel_types)

    def limit_for(self, msg_type: str) -> int | None:
        """The largest acceptable request of ``msg_type``, or None if it is refused."""
        if msg_type == PART_TYPE:  # ≥ 2 parts: each at most half the whole, plus framing
            return -(-self._parallel_limit() // 2) + (64 << 10) if self.parallel_types else None
        if self.limits is None:
            return self.max_message_bytes
        try:
            limit = int(self.limits(msg_type))
        except LookupError:
            return None
        except Exception:  # a broken limits function must not take the connection down
            server_log.exception("[%s] limits(%r) failed", self._policy.local, msg_type[:32])
            return None
        return min(limit, self.max_message_bytes) if limit > 0 else None

    def reload_crl(self) -> None:
        """Re-read the CRL; new handshakes use it at once. Live connections are kept."""
        self._crl = self.tls.load_crl()
        if self.tcp is not None:
            self.tcp.crl = self._crl
        server_log.info("[%s] CRL reloaded", self._policy.local)

    def _create_protocol(self, connection: QuicConnection, **kwargs: Any) -> ServerProtocol:
        mtls.install_mutual_tls(connection, self._policy)
        protocol = ServerProtocol(connection, server=self, **kwargs)
        if isinstance(self._server, BatchingQuicServer):
            protocol.batch = self._server.batch
            protocol.udp = self._server.udp
        self._connections.add(protocol)
        return protocol

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` over QUIC (UDP) and TLS/TCP, the same port number on
        both (0 = a port free on both); returns it."""
        for attempt in range(8 if port == 0 else 1):
            bound = await self._start_quic(host, port)
            tcp = TlsRpcServer(
                tls=self.tls, allowed_roles=self._policy.allowed_roles, handler=self.handler,
                config=self.config, max_message_bytes=self.max_message_bytes,
                limit_for=self.limit_for, budget=self.budget, typed=self.limits is not None,
                sibling=lambda peer: quic_connections_of(self._connections, peer),
            )  # fmt: skip
            tcp.crl = self._crl
            try:
                await tcp.start(host, bound)
            except OSError as exc:
                await self.close()
                if port != 0 and attempt == 0:
                    raise TransportError(f"cannot listen on TCP {host}:{bound}: {exc}") from exc
                continue  # the UDP port's TCP twin is taken: draw another
            self.tcp = tcp
            server_log.info("[%s] listening on %s:%d (QUIC/UDP and TLS/TCP)",
                            self._policy.local, host, bound)  # fmt: skip
            return bound
        raise TransportError(f"no port on {host} is free for both UDP and TCP")

    async def _start_quic(self, host: str, port: int) -> int:
        if self._server is not None:
            raise TransportError("server already started")
        # No session_ticket_fetcher/handler: resumption would skip client certificates.
        # aioquic's serve(), with the batching QuicServer subclass.
        _, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: BatchingQuicServer(
                configuration=self._quic_config,
                create_protocol=self._create_protocol,
                socket_buffer_bytes=self.config.socket_buffer_bytes,
            ),
            local_addr=(host, port),
        )
        self._server = server
        sock = self._server._transport.get_extra_info("socket")  # type: ignore[union-attr]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        """Close every connection and stop listening."""
        tcp, self.tcp = self.tcp, None
        if tcp is not None:
            await tcp.close()
        if self._server is None:
            return
        server, self._server = self._server, None
        tasks = [t for c in self._connections for t in c.tasks]
        for task in tasks:
            task.cancel()
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connections.clear()


# ---------------------------------------------------------------------------- client


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a waiter's outcome as seen (a done callback)."""
    if not future.cancelled():
        future.exception()


class _ClientProtocol(MessageProtocol):
    # aioquic's wait_connected() and ping() await their waiter through asyncio.shield:
    # when our handshake deadline cancels the wait, the waiter lives on and closing the
    # connection later fails it with ConnectionError that nobody retrieves ("Future
    # exception was never retrieved"). A done callback on each waiter retrieves it.

    async def wait_connected(self) -> None:
        if self._connected_waiter is None and not self._connected:
            self._connected_waiter = self._loop.create_future()
            self._connected_waiter.add_done_callback(_retrieve)
        waiter = self._connected_waiter
        if waiter is not None:
            await asyncio.shield(waiter)

    async def ping(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiter.add_done_callback(_retrieve)
        uid = id(waiter)
        self._ping_waiters[uid] = waiter
        self._quic.send_ping(uid)
        self.transmit()
        await asyncio.shield(waiter)

    last_heard = 0.0
    """Loop time of the last datagram from the server (see :func:`_probe`)."""

    def datagram_received(self, data: bytes | str, addr: object) -> None:
        self.last_heard = self._loop.time()
        super().datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # The socket is connected, so the kernel reports ICMP "port unreachable": the
        # server process is gone (killed, restarting). Close now rather than at the idle
        # timeout, so the caller's backoff reconnects to its successor within seconds.
        if isinstance(exc, ConnectionRefusedError) and self.closed_error is None:
            self._quic.close(reason_phrase="peer unreachable (ICMP port unreachable)")
            self.transmit()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            state = self.inbound.get(event.stream_id)
            if state is not None:
                self.on_data(state, event)
            return
        super().quic_event_received(event)


#: While a call waits for its reply, a PING this often: a server that died meanwhile
#: (its port closed) then answers with ICMP unreachable within a second, instead of the
#: call waiting, silent, for the idle timeout.
PROBE_S = 1.0


async def _probe(protocol: _ClientProtocol, silence_s: float) -> None:
    loop = asyncio.get_running_loop()
    protocol.last_heard = max(protocol.last_heard, loop.time())
    while protocol.closed_error is None:
        await asyncio.sleep(PROBE_S)
        if loop.time() - protocol.last_heard > silence_s:
            protocol._quic.close(reason_phrase=f"peer silent for {silence_s:g} s")
            protocol.transmit()
            return
        protocol._quic.send_ping(-1)  # no waiter: aioquic drops the acknowledgement
        protocol.transmit()


#: mtls's alert reason phrases: ``peer certificate refused: <reason>`` / ``... required``.
_REFUSED_PHRASE = "peer certificate refused: "


def _tls_refusal(closed: events.ConnectionTerminated | None) -> str | None:
    """The refusal a TLS alert closed the handshake with, or None if it was no alert.

    A TLS alert travels as a transport CONNECTION_CLOSE (``frame_type`` set) with error
    CRYPTO_ERROR + alert (0x100-0x1ff); our application codes (0x101-0x105, e.g.
    "too many connections") share that numeric range but close at application level
    (``frame_type`` None). The peer's reason is taken from secure-xfl's reason phrase
    when it names one, else the alert's name.
    """
    if closed is None or closed.frame_type is None:
        return None
    alert = closed.error_code - QuicErrorCode.CRYPTO_ERROR
    if not 0 <= alert <= 0xFF:
        return None
    phrase = closed.reason_phrase or ""
    if phrase.startswith(_REFUSED_PHRASE):
        reason = phrase[len(_REFUSED_PHRASE) :].split(":", 1)[0].strip()
        if reason in REJECT_REASONS:
            return reason
    if phrase == "peer certificate required":
        return "no_certificate"
    try:
        return tls.AlertDescription(alert).name
    except ValueError:
        return f"tls_alert_{alert}"


class RpcClient:
    """mTLS QUIC client for one server whose certificate must carry ``server_role``."""

    def __init__(
        self,
        *,
        tls: TlsIdentity,
        server_role: str,
        host: str,
        port: int,
        config: TransportConfig = TransportConfig(),  # noqa: B008 - frozen, immutable
    ) -> None:
        mtls.check_aioquic()
        self.tls = tls
        self.host = host
        self.port = port
        self.config = config
        self._policy = mtls.make_policy(tls, [server_role], tls.load_crl)
        self._protocol: _ClientProtocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent_streams)
        self.server_identity: PeerIdentity | None = None

    async def __aenter__(self) -> RpcClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self, *, timeout: float | None = None) -> PeerIdentity:
        """Handshake, verify the server, and wait until the server accepted us.

        Gives up after ``handshake_timeout_s`` (or ``timeout``, if shorter). Raises
        :class:`HandshakeFailed` whose ``refusal`` names a refused certificate or TLS
        failure (retrying cannot help), or :class:`TooManyConnections`.
        """
        if self._protocol is not None:
            raise TransportError("already connected")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        family, addr = infos[0][0], infos[0][4]
        connection = QuicConnection(
            configuration=mtls.build_quic_configuration(self.tls, self.config, is_client=True)
        )
        mtls.install_mutual_tls(connection, self._policy)
        # A connected socket (remote_addr): the only peer is the server, and the kernel
        # then reports ICMP errors for it (see _ClientProtocol.error_received).
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(connection, config=self.config),
            remote_addr=cast(tuple[str, int], addr),  # the very tuple aioquic sends to
            family=family,
        )
        self._transport, self._protocol = transport, protocol
        protocol.log = client_log
        protocol.udp = UdpBatcher(transport, socket_buffer_bytes=self.config.socket_buffer_bytes)
        protocol.udp.on_error = protocol.error_received
        protocol.owns_socket = True
        limit = self.config.handshake_timeout_s
        if timeout is not None:
            limit = max(0.0, min(limit, timeout))
        try:
            async with asyncio.timeout(limit):
                protocol.connect(addr)
                await protocol.wait_connected()
                # Our Finished is sent, but the server checks our certificate only on
                # receiving it: a PING answered proves the server accepted us.
                await protocol.ping()
        except (ConnectionError, TimeoutError) as exc:
            rejection = mtls.peer_rejection(connection)
            closed = protocol.closed_error
            why = (
                f"server certificate refused: {rejection}"
                if rejection is not None
                else protocol.describe_close()
                if closed is not None
                else f"no handshake within {limit:.1f}s"
            )
            await self.close()
            client_log.warning("[peer=%s:%d] handshake failed: %s", self.host, self.port, why)
            if rejection is not None:
                raise HandshakeFailed(why, refusal=rejection.reason) from exc
            refusal = _tls_refusal(closed)
            if refusal is None and closed is not None and closed.error_code == ERR_BUSY:
                raise TooManyConnections(why) from exc
            raise HandshakeFailed(why, refusal=refusal) from exc
        identity = mtls.peer_identity(connection)
        assert identity is not None  # the hook refuses to finish without one
        self.server_identity = identity
        client_log.info("[peer=%s] connected to %s:%d", identity, self.host, self.port)
        return identity

    async def call(self, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Send one request; return the reply body or raise RemoteError / TransportError."""
        protocol = self._protocol
        if protocol is None or self.server_identity is None:
            raise TransportError("not connected")
        async with self._slots:
            if protocol.closed_error is not None:
                raise ConnectionClosed(protocol.describe_close())
            stream_id = protocol._quic.get_next_available_stream_id()
            # Claim the id now: aioquic only allocates it once something is sent, so
            # concurrent calls would otherwise share a stream.
            protocol._quic.send_stream_data(stream_id, b"")
            state = protocol.open_inbound(stream_id, self.config.max_message_bytes + 1)
            state.watched = False  # the handler may legitimately compute for a long time
            assert state.done is not None
            sender = asyncio.ensure_future(protocol.send_message(stream_id, [payload]))
            probe = asyncio.ensure_future(_probe(protocol, self.config.peer_silence_s))
            try:
                async with asyncio.timeout(timeout):
                    data = await state.done
            except TimeoutError as exc:
                protocol.abort_stream(stream_id, ERR_CANCELLED)
                protocol.inbound.pop(stream_id, None)
                raise CallTimeout(f"call to {self.server_identity} timed out") from exc
            except BaseException:
                protocol.inbound.pop(stream_id, None)
                if not sender.done() and protocol.closed_error is None:
                    protocol.abort_stream(stream_id, ERR_CANCELLED)
                raise
            finally:
                probe.cancel()
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await sender  # a refused upload is explained by the reply
        return decode_response(data)

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await protocol.wait_closed()
        if protocol is not None and protocol.udp is not None:
            protocol.udp.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
