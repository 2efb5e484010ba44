"""Bounded message streams on an aioquic connection (shared by RPC server and client).

One message per direction of a bidirectional QUIC stream, ended by FIN.

* Receiving counts bytes as aioquic delivers them and aborts the stream
  (STOP_SENDING) the moment ``max_message_bytes`` would be exceeded, so a peer
  can never make us buffer more than the bound.
* Sending writes in chunks and waits for acknowledgements whenever more than
  ``send_buffer_bytes`` are unacknowledged: aioquic's send buffer is otherwise
  unbounded (and trims acknowledged bytes with an O(n) ``del``), so dumping a
  500 MB payload into it at once costs memory and throughput.
* A stream with no progress for ``stream_timeout_s`` is reset in both directions;
  so is an inbound message with a ``min_rate`` (server requests) that arrives slower
  than that on average once ``stream_timeout_s`` has passed since its first byte.

aioquic internals read here: ``QuicConnection._streams[id].sender`` offsets
``_buffer_start``/``_buffer_stop`` (unacknowledged bytes); the server's policing
(``server.py``) reads ``receiver._buffer`` / ``highest_offset`` (bytes held for
reassembly). Everything else is
aioquic's public connection API (send_stream_data, reset_stream, stop_stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events

from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.transport.config import TransportConfig
from secure_xfl.transport.errors import (
    ConnectionClosed,
    MessageTooLarge,
    StreamReset,
    StreamTimeout,
)
from secure_xfl.transport.mtls import peer_identity
from secure_xfl.transport.udp import Outbox, TransmitBatch, UdpBatcher

__all__ = [
    "ERR_BUSY",
    "ERR_CANCELLED",
    "ERR_PROTOCOL",
    "ERR_TIMEOUT",
    "ERR_TOO_LARGE",
    "Inbound",
    "MessageProtocol",
]

# QUIC application error codes used in RESET_STREAM / STOP_SENDING.
ERR_TOO_LARGE = 0x101
ERR_TIMEOUT = 0x102
ERR_BUSY = 0x103
ERR_CANCELLED = 0x104
ERR_PROTOCOL = 0x105

_CHUNK = 256 << 10  # bytes handed to aioquic per write


@dataclass(eq=False)
class Inbound:
    """One message being received on one stream."""

    stream_id: int
    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    done: asyncio.Future[bytes] | None = None
    aborted: bool = False
    watched: bool = True
    """Subject to the stall sweep (a client's reply is watched once bytes flow)."""
    replied: bool = False
    """An error reply was already sent for this (refused) stream."""
    first_byte_at: float | None = None
    """When the first byte arrived (start of the ``min_rate`` clock)."""
    min_rate: float = 0.0
    """Slowest average arrival rate in bytes/s after the grace period (0 = unchecked)."""
    msg_type: str | None = None
    """The request's message type once peeked (server with per-type limits)."""
    reserved: int = 0
    """Bytes this message claims from the server's buffer budget."""


class MessageProtocol(QuicConnectionProtocol):
    """QuicConnectionProtocol with bounded per-stream message receive and send."""

    def __init__(self, *args: object, config: TransportConfig, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.inbound: dict[int, Inbound] = {}
        self.send_blocked: dict[int, int] = {}  # stream id -> STOP_SENDING error code
        self.closed_error: events.ConnectionTerminated | None = None
        self._progress_waiters: list[asyncio.Future[None]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.log = logging.getLogger("secure_xfl.transport.streams")
        self.udp: UdpBatcher | None = None
        """Batched/GSO socket access; set by whoever owns the socket (RpcClient/RpcServer)."""
        self.owns_socket = False
        """True on a client: this connection alone reads its socket and may drain it."""
        self.batch = TransmitBatch()
        """Transmit deferral; a server's connections share the server's."""
        self._outbox = Outbox()

    # -- identity and logging -------------------------------------------------------------

    @property
    def peer(self) -> PeerIdentity | None:
        """The verified peer identity (None until the handshake verified it)."""
        return peer_identity(self._quic)

    def peer_label(self) -> str:
        """Peer identity if verified, else its network address, for log lines."""
        ident = self.peer
        if ident is not None:
            return ident.spiffe_id
        paths = getattr(self._quic, "_network_paths", None)
        return f"unverified@{paths[0].addr[0]}" if paths else "unverified"

    # -- progress notification ------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: object) -> None:
        # Client side (we own the socket): process everything already queued, then
        # transmit once. Server-side connections are fed by BatchingQuicServer.
        with self.batch.collecting():
            super().datagram_received(data, addr)  # type: ignore[arg-type]
            if self.owns_socket and self.udp is not None:
                self.udp.drain(super().datagram_received)  # type: ignore[arg-type]
        self.after_datagram()

    def after_datagram(self) -> None:
        """Hook: runs after each received datagram (or client batch) was processed."""

    def transmit(self) -> None:
        if self.batch.hold(self):
            return
        udp = self.udp
        if udp is None:
            super().transmit()
        else:
            # aioquic's transmit() (packet building, timer re-arm) unchanged; only the
            # sendto calls are collected and handed to the kernel in GSO bursts.
            transport, self._transport = self._transport, self._outbox  # type: ignore[assignment]
            try:
                super().transmit()
            finally:
                self._transport = transport
                datagrams, self._outbox.datagrams = self._outbox.datagrams, []
            udp.send(datagrams)
        # transmit() runs after every received datagram and timer: acks have been
        # processed, so wake senders waiting for buffer space.
        if self._progress_waiters:
            waiters, self._progress_waiters = self._progress_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_progress(self, timeout: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass

    def _unacked(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    # -- sending --------------------------------------------------------------------------

    async def send_message(self, stream_id: int, parts: Sequence[bytes | memoryview]) -> None:
        """Send ``parts`` then FIN on ``stream_id`` with bounded buffering."""
        high_water = self.config.send_buffer_bytes
        for part in parts:
            view = memoryview(part)
            for offset in range(0, len(view), _CHUNK):
                await self._wait_for_room(stream_id, high_water)
                self._quic.send_stream_data(stream_id, bytes(view[offset : offset + _CHUNK]))
                self.transmit()
        self._check_sendable(stream_id)
        self._quic.send_stream_data(stream_id, b"", end_stream=True)
        self.transmit()

    def _check_sendable(self, stream_id: int) -> None:
        if self.closed_error is not None:
            raise ConnectionClosed(f"connection to {self.peer_label()} closed")
        code = self.send_blocked.get(stream_id)
        if code is not None:
            raise StreamReset(code, f"peer {self.peer_label()} stopped reading (error {code})")

    async def _wait_for_room(self, stream_id: int, high_water: int) -> None:
        last_unacked = self._unacked(stream_id)
        stalled_since = time.monotonic()
        while True:
            self._check_sendable(stream_id)
            unacked = self._unacked(stream_id)
            if unacked <= high_water:
                return
            now = time.monotonic()
            if unacked < last_unacked:
                last_unacked, stalled_since = unacked, now
            elif now - stalled_since > self.config.stream_timeout_s:
                self.abort_stream(stream_id, ERR_TIMEOUT)
                raise StreamTimeout(
                    f"stream {stream_id} to {self.peer_label()}: no acknowledgement for "
                    f"{self.config.stream_timeout_s}s"
                )
            await self._wait_progress(min(1.0, self.config.stream_timeout_s / 4))

    def abort_stream(self, stream_id: int, error_code: int) -> None:
        """Reset our sending side and ask the peer to stop sending."""
        self.send_blocked.setdefault(stream_id, error_code)
        try:
            self._quic.reset_stream(stream_id, error_code)
        except (ValueError, AssertionError):  # already finished or reset
            pass
        try:
            self._quic.stop_stream(stream_id, error_code)
        except (ValueError, AssertionError):
            pass
        self.transmit()

    # -- receiving ------------------------------------------------------------------------

    def open_inbound(self, stream_id: int, limit: int) -> Inbound:
        state = Inbound(stream_id=stream_id, limit=limit)
        state.done = asyncio.get_running_loop().create_future()
        self.inbound[stream_id] = state
        self._ensure_sweeper()
        return state

    def on_data(self, state: Inbound, event: events.StreamDataReceived) -> bool:
        """Account ``event`` into ``state``; True when the message is complete."""
        if state.aborted:
            return False
        if state.size + len(event.data) > state.limit:
            self.fail_inbound(
                state,
                MessageTooLarge(f"message on stream {state.stream_id} exceeds {state.limit} bytes"),
                ERR_TOO_LARGE,
            )
            return False
        if event.data:
            state.chunks.append(event.data)
            state.size += len(event.data)
            state.last_progress = time.monotonic()
            state.watched = True
            if state.first_byte_at is None:
                state.first_byte_at = state.last_progress
        if event.end_stream:
            self.inbound.pop(state.stream_id, None)
            data = state.chunks[0] if len(state.chunks) == 1 else b"".join(state.chunks)
            state.chunks = []
            if state.done is not None and not state.done.done():
                state.done.set_result(data)
            return True
        return False

    def fail_inbound(self, state: Inbound, exc: Exception, error_code: int | None) -> None:
        """Drop what was buffered, fail the waiter, optionally abort the stream."""
        state.aborted = True
        state.chunks = []
        state.last_progress = time.monotonic()  # keep the tombstone a while for late frames
        self.release_claim(state)
        if state.done is not None and not state.done.done():
            state.done.set_exception(exc)
            state.done.exception()  # mark retrieved: nobody may be awaiting it
        if error_code is not None:
            try:
                self._quic.stop_stream(state.stream_id, error_code)
            except ValueError:
                pass
            self.transmit()

    def release_claim(self, state: Inbound) -> None:
        """Hook: ``state`` no longer holds buffered bytes (the server's budget)."""

    def can_forget(self, state: Inbound) -> bool:
        """Hook: whether a refused stream's tombstone may be dropped after the timeout."""
        return True

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        timeout = self.config.stream_timeout_s
        interval = max(0.05, min(1.0, timeout / 4))
        while self.inbound and self.closed_error is None:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for state in list(self.inbound.values()):
                if not state.watched:
                    continue
                if now - state.last_progress > timeout:
                    if state.aborted:
                        if self.can_forget(state):
                            self.inbound.pop(state.stream_id, None)
                        continue
                    why = f"stalled for {timeout:.1f}s"
                elif state.aborted or not self._too_slow(state, now):
                    continue
                else:
                    took = now - (state.first_byte_at or now)
                    why = (
                        f"too slow: {state.size} bytes in {took:.1f}s "
                        f"(minimum {state.min_rate:.0f} B/s after {timeout:.1f}s)"
                    )
                self.log.warning(
                    "[peer=%s] stream %d %s: reset", self.peer_label(), state.stream_id, why
                )
                self.fail_inbound(
                    state, StreamTimeout(f"stream {state.stream_id} {why}"), ERR_TIMEOUT
                )
                self.abort_stream(state.stream_id, ERR_TIMEOUT)
                self.on_stream_timeout(state.stream_id)

    def _too_slow(self, state: Inbound, now: float) -> bool:
        """Below ``min_rate`` on average, counting from the grace period's end."""
        if state.min_rate <= 0 or state.first_byte_at is None:
            return False
        late = now - state.first_byte_at - self.config.stream_timeout_s
        return late > 0 and state.size < state.min_rate * late

    def on_stream_timeout(self, stream_id: int) -> None:
        """Hook for subclasses: a stream was reset for stalling."""

    # -- events ---------------------------------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        # Deliberately not calling super(): aioquic's default feeds unbounded
        # asyncio.StreamReaders, which is exactly what we must not do.
        if isinstance(event, events.StopSendingReceived):
            self.send_blocked.setdefault(event.stream_id, event.error_code)
        elif isinstance(event, events.StreamReset):
            state = self.inbound.pop(event.stream_id, None)
            if state is not None and not state.aborted:
                self.fail_inbound(state, StreamReset(event.error_code), None)
        elif isinstance(event, events.ConnectionTerminated):
            self.closed_error = event
            exc = ConnectionClosed(self.describe_close())
            for state in list(self.inbound.values()):
                self.fail_inbound(state, exc, None)
            self.inbound.clear()
            if self._sweeper is not None:
                self._sweeper.cancel()
            self.transmit()  # wakes blocked senders, which then see closed_error

    def describe_close(self) -> str:
        """Human-readable reason the connection closed."""
        event = self.closed_error
        if event is None:
            return "connection open"
        phrase = event.reason_phrase or "no reason given"
        return (
            f"connection with {self.peer_label()} closed (error 0x{event.error_code:x}: {phrase})"
        )
