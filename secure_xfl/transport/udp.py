"""UDP batching for aioquic: drain the socket per wake-up, send bursts with GSO.

aioquic's asyncio glue handles one datagram per event-loop iteration and, after
each one, runs ``transmit()`` (a full pass over the packet builder, plus an ACK
send most of the time). On loopback that fixed cost per datagram, not
cryptography, dominates. Two changes here cut it without touching the QUIC state
machine or any security check:

* **Receive batching.** When the loop reports the socket readable, the first
  datagram arrives through asyncio as usual; we then keep reading (non-blocking)
  from a duplicate of the same socket until it is empty or :data:`BATCH_LIMIT`
  datagrams were handled, feeding each to its connection, and run ``transmit()``
  once per touched connection at the end. Every datagram still goes through
  ``QuicConnection.receive_datagram`` exactly as before (same decryption, same
  frame checks, same events); only the ACK/transmit cadence changes.
* **Send batching (Linux UDP GSO).** A burst of equal-size datagrams to one peer
  is handed to the kernel in one ``sendmsg`` with ``UDP_SEGMENT``; the kernel
  splits it back into the very same datagrams. Where GSO is unavailable (other
  OS, old kernel, the asyncio transport has queued data, any error) we fall back
  to ``transport.sendto`` per datagram.

The duplicate socket shares the kernel socket with the asyncio transport; it is
closed with the transport (``close()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

__all__ = ["BATCH_LIMIT", "TransmitBatch", "UdpBatcher"]

log = logging.getLogger("secure_xfl.transport.udp")

#: Most datagrams handled per socket wake-up before transmitting and yielding.
BATCH_LIMIT = 64
#: Largest datagram we ever read (QUIC datagrams are at most 65527 bytes).
_RECV_SIZE = 65536
#: Linux UDP_SEGMENT (GSO) socket option; not exported by Python's socket module.
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
#: Kernel limits for one GSO send: 64 segments, 64 KiB of payload (IPv4 total length).
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000

Address = tuple[str, int] | tuple[str, int, int, int]


class UdpBatcher:
    """Batched receive and (optionally GSO) send on one asyncio datagram transport."""

    def __init__(self, transport: asyncio.DatagramTransport, *, socket_buffer_bytes: int) -> None:
        self.transport = transport
        self.on_error: Callable[[OSError], None] | None = None
        """Told of socket errors the batcher reads in asyncio's place (ICMP unreachable
        on a connected socket: the protocol closes at once instead of idling out)."""
        wrapped = transport.get_extra_info("socket")
        self._sock: socket.socket | None = wrapped.dup() if wrapped is not None else None
        self._gso = self._sock is not None and hasattr(socket, "SOL_UDP")
        if self._sock is not None:
            self._sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                # The kernel caps this at net.core.[rw]mem_max; a bigger receive buffer
                # absorbs bursts instead of dropping them (a drop costs a congestion
                # window halving and a Python-level loss recovery).
                with contextlib.suppress(OSError):
                    if self._sock.getsockopt(socket.SOL_SOCKET, option) < socket_buffer_bytes:
                        self._sock.setsockopt(socket.SOL_SOCKET, option, socket_buffer_bytes)

    def close(self) -> None:
        """Release the duplicate socket (the asyncio transport closes its own)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- receiving ------------------------------------------------------------------------

    def drain(self, handle: Callable[[bytes, Address], None], limit: int = BATCH_LIMIT) -> None:
        """Feed up to ``limit`` already-queued datagrams to ``handle`` (never blocks)."""
        sock = self._sock
        if sock is None or self.transport.is_closing():
            return
        for _ in range(limit):
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP unreachable, now consumed: pass it on
                self._report(exc)
                return
            handle(data, addr)

    def _report(self, exc: OSError) -> None:
        if self.on_error is not None and isinstance(exc, ConnectionRefusedError):
            self.on_error(exc)

    # -- sending --------------------------------------------------------------------------

    def send(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        """Send datagrams in order; runs of equal-size datagrams to one peer use GSO."""
        run: list[bytes] = []
        run_addr: Address | None = None
        run_bytes = 0
        for data, addr in datagrams:
            if run and (
                addr != run_addr
                or len(data) > len(run[0])
                or len(run[-1]) != len(run[0])  # only the last segment may be shorter
                or len(run) >= _GSO_MAX_SEGMENTS
                or run_bytes + len(data) > _GSO_MAX_BYTES
            ):
                self._send_run(run, run_addr)
                run, run_bytes = [], 0
            run.append(data)
            run_addr = addr
            run_bytes += len(data)
        if run:
            self._send_run(run, run_addr)

    def _send_run(self, run: list[bytes], addr: Address | None) -> None:
        assert addr is not None
        sock = self._sock
        if (
            len(run) > 1
            and self._gso
            and sock is not None
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0  # type: ignore[attr-defined]
        ):
            size = len(run[0])
            try:
                sent = sock.sendmsg(
                    run, [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))], 0, addr
                )
            except (BlockingIOError, InterruptedError):
                pass  # socket buffer full: let the transport queue them
            except ConnectionRefusedError as exc:  # a pending ICMP error, not GSO's fault
                self._report(exc)
            except OSError as exc:
                self._gso = False
                log.debug("UDP GSO unavailable (%s): sending datagrams one by one", exc)
            else:
                if sent != sum(len(d) for d in run):  # never for UDP; QUIC would recover
                    self._gso = False
                return
        for data in run:
            self.transport.sendto(data, addr)


class _Transmitter(Protocol):
    def transmit(self) -> None: ...


class TransmitBatch:
    """Defers ``transmit()`` of connections while a batch of datagrams is processed."""

    def __init__(self) -> None:
        self.active = False
        self.pending: dict[_Transmitter, None] = {}

    def hold(self, protocol: _Transmitter) -> bool:
        """True (and remember ``protocol``) if its transmit must wait for the batch end."""
        if self.active:
            self.pending[protocol] = None
        return self.active

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Hold transmits inside the block, then transmit every touched connection once."""
        self.active = True
        try:
            yield
        finally:
            self.active = False
            while self.pending:
                protocol = next(iter(self.pending))
                del self.pending[protocol]
                protocol.transmit()


class Outbox:
    """Stand-in transport for aioquic's ``transmit()``: collects ``sendto`` calls."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.datagrams.append((data, addr))
