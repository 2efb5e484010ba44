"""The server side of one connection: admission and bounded memory per peer.

* **Connections per peer**: right after a peer's certificate is verified, a
  connection beyond ``max_connections_per_peer`` for that identity is closed
  (application error 0x103).
* **Requests per connection**: a request arriving while ``max_concurrent_streams``
  are being received or handled is refused ``busy``.
* **Per-type limits**: with ``RpcServer(limits=...)`` the message type is peeked from
  the request's first bytes (``limits.peek_type``) and the type's limit applies from
  then on; a bad prefix or a type the endpoint does not accept is refused
  ``protocol``, bytes past the limit ``message_too_large`` — as they arrive.
* **Buffer budget**: every request claims bytes from the server-wide
  :class:`~secure_xfl.transport.limits.BufferBudget` (its type's limit once known);
  a claim that does not fit is refused ``busy``. Claims are released when the
  request is answered, refused, reset or times out.
* **Reassembly**: aioquic buffers out-of-order stream data itself and grows its
  flow-control windows as data arrives, so after every datagram the highest offset
  a peer reached on each stream is checked against that stream's limit, and bytes
  held on refused streams are bounded per connection.

Refusals send STOP_SENDING (the peer's aioquic resets its side) and an error reply
with the typed code; the connection keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, cast

from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode

from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.transport import mtls
from secure_xfl.transport.errors import (
    MalformedRequest,
    MessageTooLarge,
    ServerBusy,
    TransportError,
)
from secure_xfl.transport.framing import answer, encode_error
from secure_xfl.transport.limits import PREFIX_BYTES, head, peek_type
from secure_xfl.transport.streams import (
    ERR_BUSY,
    ERR_CANCELLED,
    ERR_PROTOCOL,
    ERR_TOO_LARGE,
    Inbound,
    MessageProtocol,
)
from secure_xfl.transport.udp import TransmitBatch, UdpBatcher

if TYPE_CHECKING:
    from secure_xfl.transport.rpc import RpcServer

__all__ = ["BatchingQuicServer", "ServerProtocol"]

server_log = logging.getLogger("secure_xfl.transport.rpc.server")

#: Refusals logged in full per connection; after that every 1000th (a flood of bad
#: requests must not become a flood of log lines).
_LOGGED_REFUSALS = 20

_STOP_CODES: dict[type[TransportError], int] = {
    MessageTooLarge: ERR_TOO_LARGE,
    ServerBusy: ERR_BUSY,
    MalformedRequest: ERR_PROTOCOL,
}


def quic_connections_of(
    connections: Iterable[ServerProtocol], peer: PeerIdentity, besides: object = None
) -> int:
    """Admitted, open QUIC connections of ``peer`` (other than ``besides``)."""
    return sum(
        1
        for c in connections
        if c is not besides and c.admitted and c.closed_error is None and c.peer == peer
    )


class ServerProtocol(MessageProtocol):
    """One client connection of an :class:`RpcServer`."""

    def __init__(self, quic: QuicConnection, *, server: RpcServer, **kwargs: Any) -> None:
        super().__init__(quic, config=server.config, **kwargs)
        self.server = server
        self.tasks: set[asyncio.Task[None]] = set()
        self.serving: set[int] = set()
        """Streams whose complete request is being handled (or its reply sent)."""
        self.admitted = False
        """Verified and within ``max_connections_per_peer``."""
        self.refusals = 0
        """Requests refused on this connection (logged in full only for the first few)."""
        self.log = server_log
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            server.config.handshake_timeout_s, self._handshake_deadline
        )

    def _handshake_deadline(self) -> None:
        if self.peer is None and self.closed_error is None:
            self.log.warning("[peer=%s] handshake timed out: closing", self.peer_label())
            self.close(QuicErrorCode.CONNECTION_REFUSED, "handshake timeout")

    # -- connection admission -------------------------------------------------------------

    def _admit_connection(self) -> bool:
        if self.admitted:
            return True
        if self.closed_error is not None or self._quic._close_event is not None:
            return False
        peer = self.peer
        if peer is None:
            # Defence in depth: mTLS makes this unreachable (no 1-RTT keys before
            # the peer is verified), but never hand bytes to a handler without it.
            self.log.error("[peer=%s] stream data before verification", self.peer_label())
            self.close(QuicErrorCode.PROTOCOL_VIOLATION, "unauthenticated")
            return False
        cap = self.config.max_connections_per_peer
        # One cap per peer across both transports (its TLS/TCP connections count too).
        tcp = self.server.tcp
        others = quic_connections_of(self.server._connections, peer, besides=self)
        others += tcp.connections_of(peer) if tcp is not None else 0
        if others >= cap:
            self.log.warning(
                "[peer=%s] connection refused: %d already open (max_connections_per_peer=%d)",
                peer,
                others,
                cap,
            )
            self.close(ERR_BUSY, "too many connections from this peer")
            return False
        self.admitted = True
        return True

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            self._on_stream_data(event)
            return
        if isinstance(event, events.HandshakeCompleted):
            self._handshake_timer.cancel()
            if self._admit_connection():
                self.log.info("[peer=%s] connected", self.peer_label())
        elif isinstance(event, events.ConnectionTerminated):
            self._handshake_timer.cancel()
            rejection = mtls.peer_rejection(self._quic)
            if rejection is None and self.admitted:
                self.log.info(
                    "[peer=%s] disconnected (%d requests refused)", self.peer_label(), self.refusals
                )
            for task in self.tasks:
                task.cancel()
            self.server._connections.discard(self)
        super().quic_event_received(event)

    # -- requests -------------------------------------------------------------------------

    def _live_requests(self) -> int:
        return sum(1 for s in self.inbound.values() if not s.aborted) + len(self.serving)

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        state = self.inbound.get(stream_id)
        if state is None:
            if not self._admit_connection():
                return
            if stream_id % 4 != 0:  # only client-initiated bidirectional streams
                self.log.warning("[peer=%s] unexpected stream %d", self.peer_label(), stream_id)
                if stream_id % 4 == 2:
                    self._quic.stop_stream(stream_id, ERR_CANCELLED)
                return
            state = self._open_request(stream_id)
            if state is None:
                return
        if state.aborted:
            return  # refused earlier: late bytes are dropped
        complete = self.on_data(state, event)
        if state.aborted:  # over its limit: on_data sent STOP_SENDING
            exc = state.done.exception() if state.done is not None else None
            self._refuse(state, exc if isinstance(exc, TransportError) else MessageTooLarge())
        elif self._check_request(state, final=complete) and complete:
            self._start(state)

    def _open_request(self, stream_id: int) -> Inbound | None:
        """Admit a new request stream, or refuse it ``busy`` (None)."""
        state = self.open_inbound(stream_id, self.server.max_message_bytes)
        state.min_rate = self.config.min_request_rate_bytes_s
        cap = self.config.max_concurrent_streams
        if self._live_requests() > cap:
            self._refuse(state, ServerBusy(f"more than {cap} requests in flight on a connection"))
            return None
        if not self._claim(state, PREFIX_BYTES):
            self._refuse(state, ServerBusy("server buffer budget exhausted; retry later"))
            return None
        return state

    def _check_request(self, state: Inbound, *, final: bool) -> bool:
        """Apply the type's limit once known and keep the claim current; False if refused."""
        limits = self.server.limits
        if limits is not None and state.msg_type is not None:
            return True  # its claim already covers its whole limit
        want = max(PREFIX_BYTES, state.size)
        if limits is not None:
            try:
                msg_type = peek_type(self._prefix(state), final=final)
                if msg_type is not None:
                    limit = self.server.limit_for(msg_type)
                    if limit is None:
                        raise MalformedRequest(f"message type {msg_type!r} is not accepted here")
                    state.msg_type, state.limit, want = msg_type, limit, limit
                    if state.size > limit:
                        raise MessageTooLarge(f"{msg_type!r} request exceeds {limit} bytes")
            except TransportError as exc:
                self._refuse(state, exc, final=final)
                return False
        if not self._claim(state, want):
            self._refuse(state, ServerBusy("server buffer budget exhausted; retry later"), final)
            return False
        return True

    def _prefix(self, state: Inbound) -> bytes:
        done = state.done
        if done is not None and done.done() and done.exception() is None:
            return done.result()[:PREFIX_BYTES]  # complete: on_data handed the bytes over
        return head(state.chunks)

    def _claim(self, state: Inbound, want: int) -> bool:
        # A request whose own limit is known may use a budget as large as that limit.
        typed = self.server.limits is None or state.msg_type is not None
        if not self.server.budget.resize(state.reserved, want, ceiling=state.limit if typed else 0):
            return False
        state.reserved = want
        return True

    def release_claim(self, state: Inbound) -> None:
        if state.reserved:
            self.server.budget.resize(state.reserved, 0)
            state.reserved = 0

    def _refuse(self, state: Inbound, exc: TransportError, final: bool = False) -> None:
        """Refuse ``state`` with ``exc``'s typed code (STOP_SENDING unless it ended)."""
        if final:
            state.aborted = True
            self.release_claim(state)
        elif not state.aborted:
            self.fail_inbound(state, exc, _STOP_CODES.get(type(exc), ERR_CANCELLED))
        if not state.replied:
            state.replied = True
            self.refusals += 1
            if self.refusals <= _LOGGED_REFUSALS or self.refusals % 1000 == 0:
                budget = self.server.budget
                self.log.warning(
                    "[peer=%s] request on stream %d refused: %s (%s; refusal %d on this "
                    "connection; %d of %d buffer bytes claimed)",
                    self.peer_label(),
                    state.stream_id,
                    exc,
                    exc.code,
                    self.refusals,
                    budget.used,
                    max(budget.limit, state.limit),
                )
            self._spawn(self._send_reply(state.stream_id, encode_error(exc.code, str(exc))))

    def _start(self, state: Inbound) -> None:
        assert state.done is not None
        payload = state.done.result()
        state.done = None  # the handler's task holds the bytes from now on
        self._claim(state, len(payload))  # shrinks to what it really holds
        self.serving.add(state.stream_id)

        def finished(_: object = None) -> None:
            self.serving.discard(state.stream_id)
            self.release_claim(state)

        async def serve() -> None:
            try:
                await self._serve(state.stream_id, payload)
            finally:
                # In the step that sent the reply: a batch drained later in this loop
                # iteration may already hold the client's next request.
                finished()

        self._spawn(serve()).add_done_callback(finished)  # also if cancelled unstarted

    def after_datagram(self) -> None:
        """Police what aioquic holds for reassembly (data beyond a gap raises no event)."""
        if not self.admitted or self.closed_error is not None:
            return
        stray = 0
        for stream_id, stream in list(self._quic._streams.items()):
            rcv = stream.receiver
            if not rcv._buffer or rcv.is_finished:
                continue
            state = self.inbound.get(stream_id)
            if state is None and stream_id % 4 == 0 and rcv._buffer_start == 0:
                state = self._open_request(stream_id)  # a request whose first bytes are late
            if state is None or state.aborted:
                stray += len(rcv._buffer)
            elif rcv.highest_offset > state.limit:
                self._refuse(
                    state,
                    MessageTooLarge(
                        f"request reaches offset {rcv.highest_offset}, over its limit of "
                        f"{state.limit} bytes"
                    ),
                )
            elif self.server.limits is None or state.msg_type is None:
                # claim what aioquic holds; a typed claim already covers its limit
                if not self._claim(state, max(PREFIX_BYTES, rcv.highest_offset)):
                    self._refuse(state, ServerBusy("server buffer budget exhausted; retry later"))
        if stray > self.config.flow_control_window_bytes:
            self.log.warning(
                "[peer=%s] %d bytes out of order on refused streams: closing",
                self.peer_label(),
                stray,
            )
            self.close(ERR_TOO_LARGE, "too much data on refused streams")

    def can_forget(self, state: Inbound) -> bool:
        # Keep a refused stream's tombstone while aioquic still receives on it, so
        # late bytes never pass for a new request (aioquic bounds open streams).
        stream = self._quic._streams.get(state.stream_id)
        return stream is None or stream.receiver.is_finished

    # -- replies --------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

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
        reply = await answer(self.server.handler, peer, payload, self.log, f"stream {stream_id}")
        del payload  # the reply may take a while to send; the request is done with
        await self._send_reply(stream_id, reply)


class BatchingQuicServer(QuicServer):
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
