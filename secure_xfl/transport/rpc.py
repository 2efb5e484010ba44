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

import msgpack
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.errors import SecureXFLError
from secure_xfl.transport import mtls
from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.errors import (
    CallTimeout,
    ConnectionClosed,
    HandshakeFailed,
    RemoteError,
    TransportError,
)
from secure_xfl.transport.streams import ERR_BUSY, ERR_CANCELLED, Inbound, MessageProtocol
from secure_xfl.transport.udp import TransmitBatch, UdpBatcher

__all__ = ["Handler", "RpcClient", "RpcServer"]

Handler = Callable[[PeerIdentity, bytes], Awaitable[bytes]]

STATUS_OK = 0
STATUS_ERROR = 1
_MAX_ERROR_BODY = 64 << 10

server_log = logging.getLogger("secure_xfl.transport.rpc.server")
client_log = logging.getLogger("secure_xfl.transport.rpc.client")


def encode_error(code: str, message: str, reason: str | None = None) -> bytes:
    """Error reply: status byte 1 + msgpack {"code", "message"[, "reason"]} (truncated).

    ``reason`` is the machine-readable refusal (e.g. a key-holder policy rule), so a
    caller can act on it without parsing ``message``.
    """
    fields = {"code": code[:64], "message": message[:4096]}
    if reason:
        fields["reason"] = reason[:64]
    body: bytes = msgpack.packb(fields)
    return bytes([STATUS_ERROR]) + body


def decode_response(data: bytes) -> bytes:
    """Body of an ok reply; raises RemoteError for an error reply."""
    if not data:
        raise TransportError("empty response (no status byte)")
    status = data[0]
    if status == STATUS_OK:
        return data[1:]
    if status == STATUS_ERROR and len(data) <= _MAX_ERROR_BODY:
        try:
            body = msgpack.unpackb(data[1:], raw=False)
            return_code, message = str(body["code"]), str(body["message"])
            reason = body.get("reason")
            reason = None if reason is None else str(reason)[:64]
        except Exception as exc:  # any malformed body is the peer's protocol error
            raise TransportError("malformed error reply") from exc
        raise RemoteError(return_code, message, reason)
    raise TransportError(f"invalid response status byte {status}")


# ---------------------------------------------------------------------------- server


class _ServerProtocol(MessageProtocol):
    def __init__(self, quic: QuicConnection, *, server: RpcServer, **kwargs: Any) -> None:
        super().__init__(quic, config=server.config, **kwargs)
        self.server = server
        self.tasks: set[asyncio.Task[None]] = set()
        self.log = server_log
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            server.config.handshake_timeout_s, self._handshake_deadline
        )

    def _handshake_deadline(self) -> None:
        if self.peer is None and self.closed_error is None:
            self.log.warning("[peer=%s] handshake timed out: closing", self.peer_label())
            self.close(QuicErrorCode.CONNECTION_REFUSED, "handshake timeout")

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event)
            return
        if isinstance(event, events.HandshakeCompleted):
            self._handshake_timer.cancel()
            self.log.info("[peer=%s] connected", self.peer_label())
        elif isinstance(event, events.ConnectionTerminated):
            self._handshake_timer.cancel()
            rejection = mtls.peer_rejection(self._quic)
            if rejection is None:
                self.log.info("[peer=%s] disconnected", self.peer_label())
            for task in self.tasks:
                task.cancel()
            self.server._connections.discard(self)
        super().quic_event_received(event)

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        state = self.inbound.get(stream_id)
        if state is None:
            # Defence in depth: mTLS makes this unreachable (no 1-RTT keys before
            # the peer is verified), but never hand bytes to a handler without it.
            if self.peer is None:
                self.log.error("[peer=%s] stream data before verification", self.peer_label())
                self.close(QuicErrorCode.PROTOCOL_VIOLATION, "unauthenticated")
                return
            if stream_id % 4 != 0:  # only client-initiated bidirectional streams
                self.log.warning("[peer=%s] unexpected stream %d", self.peer_label(), stream_id)
                if stream_id % 4 == 2:
                    self._quic.stop_stream(stream_id, ERR_CANCELLED)
                return
            if len(self.tasks) + len(self.inbound) >= self.config.max_concurrent_streams:
                self.log.warning("[peer=%s] too many concurrent requests", self.peer_label())
                self._reply_and_stop(stream_id, "busy", "too many concurrent requests", ERR_BUSY)
                self.inbound[stream_id] = self._tombstone(stream_id)
                return
            state = self.open_inbound(stream_id, self.server.max_message_bytes)
        if self.on_data(state, event):
            assert state.done is not None
            payload = state.done.result()
            self._spawn(self._serve(stream_id, payload))
        elif state.aborted and state.done is not None and state.done.done():
            # Oversized: on_data already sent STOP_SENDING; tell the client why.
            exc = state.done.exception()
            if isinstance(exc, SecureXFLError) and not state.replied:
                state.replied = True
                self.log.warning("[peer=%s] request refused: %s", self.peer_label(), exc)
                self._spawn(self._send_reply(stream_id, encode_error(exc.code, str(exc))))

    def _tombstone(self, stream_id: int) -> Inbound:
        state = self.open_inbound(stream_id, 0)
        state.aborted = state.replied = True
        return state

    def _reply_and_stop(self, stream_id: int, code: str, message: str, err: int) -> None:
        self._quic.stop_stream(stream_id, err)
        self._spawn(self._send_reply(stream_id, encode_error(code, message)))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send_reply(self, stream_id: int, reply: bytes | list[bytes]) -> None:
        parts = reply if isinstance(reply, list) else [reply]
        try:
            await self.send_message(stream_id, parts)
        except TransportError as exc:
            self.log.warning(
                "[peer=%s] reply on stream %d not delivered: %s", self.peer_label(), stream_id, exc
            )

    async def _serve(self, stream_id: int, payload: bytes) -> None:
        peer = self.peer
        assert peer is not None  # checked before the stream was accepted
        try:
            body = await self.server.handler(peer, payload)
            if not isinstance(body, bytes | bytearray | memoryview):
                raise TypeError(f"handler returned {type(body).__name__}, not bytes")
            reply: list[bytes] = [bytes([STATUS_OK]), body]  # type: ignore[list-item]
        except asyncio.CancelledError:
            raise
        except SecureXFLError as exc:
            self.log.info("[peer=%s] handler refused request: %s (%s)", peer, exc, exc.code)
            reason = getattr(exc, "reason", None)
            reply = [encode_error(exc.code, str(exc), reason if isinstance(reason, str) else None)]
        except Exception:
            self.log.exception("[peer=%s] handler crashed on stream %d", peer, stream_id)
            reply = [encode_error("internal", "internal server error")]
        await self._send_reply(stream_id, reply)


class _BatchingQuicServer(QuicServer):
    """aioquic's QuicServer (unchanged dispatch) reading all queued datagrams per wake-up.

    Each datagram goes through ``QuicServer.datagram_received`` as usual; the
    connections' transmits are deferred to the end of the batch (see ``udp``).
    """

    def __init__(self, *, socket_buffer_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch = TransmitBatch()
        self.udp: UdpBatcher | None = None
        self._socket_buffer_bytes = socket_buffer_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.udp = UdpBatcher(
            cast(asyncio.DatagramTransport, transport),
            socket_buffer_bytes=self._socket_buffer_bytes,
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.udp is not None:
            self.udp.close()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        with self.batch.collecting():
            super().datagram_received(data, addr)
            if self.udp is not None:
                self.udp.drain(super().datagram_received)


class RpcServer:
    """mTLS QUIC server: each verified request stream is answered by ``handler``."""

    def __init__(
        self,
        *,
        tls: TlsIdentity,
        allowed_roles: Collection[str],
        handler: Handler,
        config: TransportConfig = TransportConfig(),  # noqa: B008 - frozen, immutable
        max_message_bytes: int | None = None,
    ) -> None:
        mtls.check_aioquic()
        self.tls = tls
        self.config = config
        self.handler = handler
        self.max_message_bytes = max_message_bytes or config.max_message_bytes
        self._crl = tls.load_crl()
        self._policy = mtls.make_policy(tls, allowed_roles, lambda: self._crl)
        self._quic_config = mtls.build_quic_configuration(tls, config, is_client=False)
        self._server: QuicServer | None = None
        self._connections: set[_ServerProtocol] = set()

    def reload_crl(self) -> None:
        """Re-read the CRL; new handshakes use it at once. Live connections are kept."""
        self._crl = self.tls.load_crl()
        server_log.info("[%s] CRL reloaded", self._policy.local)

    def _create_protocol(self, connection: QuicConnection, **kwargs: Any) -> _ServerProtocol:
        mtls.install_mutual_tls(connection, self._policy)
        protocol = _ServerProtocol(connection, server=self, **kwargs)
        if isinstance(self._server, _BatchingQuicServer):
            protocol.batch = self._server.batch
            protocol.udp = self._server.udp
        self._connections.add(protocol)
        return protocol

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the bound port."""
        if self._server is not None:
            raise TransportError("server already started")
        # No session_ticket_fetcher/handler: resumption would skip client certificates.
        # aioquic's serve(), with the batching QuicServer subclass.
        _, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _BatchingQuicServer(
                configuration=self._quic_config,
                create_protocol=self._create_protocol,
                socket_buffer_bytes=self.config.socket_buffer_bytes,
            ),
            local_addr=(host, port),
        )
        self._server = server
        sock = self._server._transport.get_extra_info("socket")  # type: ignore[union-attr]
        bound = int(sock.getsockname()[1])
        server_log.info("[%s] listening on %s:%d", self._policy.local, host, bound)
        return bound

    async def close(self) -> None:
        """Close every connection and stop listening."""
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


class _ClientProtocol(MessageProtocol):
    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            state = self.inbound.get(event.stream_id)
            if state is not None:
                self.on_data(state, event)
            return
        super().quic_event_received(event)


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

    async def connect(self) -> PeerIdentity:
        """Handshake, verify the server, and wait until the server accepted us."""
        if self._protocol is not None:
            raise TransportError("already connected")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        family, addr = infos[0][0], infos[0][4]
        connection = QuicConnection(
            configuration=mtls.build_quic_configuration(self.tls, self.config, is_client=True)
        )
        mtls.install_mutual_tls(connection, self._policy)
        local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)  # noqa: S104 - ephemeral
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(connection, config=self.config),
            local_addr=local,
            family=family,
        )
        self._transport, self._protocol = transport, protocol
        protocol.log = client_log
        protocol.udp = UdpBatcher(transport, socket_buffer_bytes=self.config.socket_buffer_bytes)
        protocol.owns_socket = True
        try:
            async with asyncio.timeout(self.config.handshake_timeout_s):
                protocol.connect(addr)
                await protocol.wait_connected()
                # Our Finished is sent, but the server checks our certificate only on
                # receiving it: a PING answered proves the server accepted us.
                await protocol.ping()
        except (ConnectionError, TimeoutError) as exc:
            rejection = mtls.peer_rejection(connection)
            why = (
                f"server certificate refused: {rejection}"
                if rejection is not None
                else protocol.describe_close()
                if protocol.closed_error is not None
                else f"no handshake within {self.config.handshake_timeout_s}s"
            )
            await self.close()
            client_log.warning("[peer=%s:%d] handshake failed: %s", self.host, self.port, why)
            raise HandshakeFailed(why) from exc
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
