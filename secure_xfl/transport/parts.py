"""Parallel QUIC: one large request carried by several connections in worker processes.

aioquic's per-packet work is pure Python and holds the GIL (~150 µs per datagram
received, ~140 µs built), so one connection tops out near one core. A large request (an
upload) is therefore cut into ``k`` parts, each sent by its own worker *process* over
its own mTLS connection (the same identity, verified by the server like any other
connection), and reassembled by the server:

* each part is a ``part`` message: ``{"t": "part", "v": 1, "id": 16 random bytes,
  "i": index, "n": count, "len": total length, "sha": SHA-256 of the whole, "data"}``;
* the server (:class:`Reassembler`, wrapped around the application handler) keeps at
  most one message in reassembly per peer, claims its declared length from the
  server-wide buffer budget up front (refusing ``busy``) and refuses a declared length
  over the largest request the endpoint accepts (``message_too_large``), a part that
  does not fit its slot, a part seen twice or a count over ``MAX_PARTS``
  (``protocol``); an incomplete message is dropped after ``stream_timeout_s``;
* once every part is in, the whole must match its SHA-256 and its own message type's
  limit; only then is it handed to the application as one request, whose reply goes
  back on the part that completed it (the others are answered ``part_ack``).

Parts travel over QUIC or TLS/TCP alike (the reassembly sits above the transport).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import msgpack

from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.errors import MalformedRequest, MessageTooLarge, ServerBusy
from secure_xfl.transport.limits import BufferBudget, peek_type

__all__ = ["MAX_PARTS", "PART_TYPE", "Reassembler", "parallel_call", "shutdown_pools", "split"]

log = logging.getLogger("secure_xfl.transport.parts")

PART_TYPE = "part"
MAX_PARTS = 64
#: The reply to every part but the one that completes the message.
PART_ACK = bytes(msgpack.packb({"t": "part_ack", "v": 1}))


def split(payload: bytes, k: int) -> list[bytes]:
    """``payload`` as ``k`` encoded ``part`` messages (the last ones may be shorter)."""
    if not 1 <= k <= MAX_PARTS:
        raise ValueError(f"parts must be within [1, {MAX_PARTS}]")
    upload_id, digest = os.urandom(16), hashlib.sha256(payload).digest()
    size = -(-len(payload) // k)
    view = memoryview(payload)
    head = {"t": PART_TYPE, "v": 1, "id": upload_id, "n": k, "len": len(payload), "sha": digest}
    return [
        bytes(msgpack.packb({**head, "i": i, "data": bytes(view[i * size : (i + 1) * size])}))
        for i in range(k)
    ]


@dataclass
class _Pending:
    id: bytes
    count: int
    digest: bytes
    buf: bytearray
    started: float
    seen: set[int] = field(default_factory=set)


def _field(msg: dict[Any, Any], name: str, kind: type, lo: int = 0, hi: int = 1 << 62) -> Any:
    value = msg.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedRequest(f"part.{name} must be {kind.__name__}")
    if isinstance(value, int) and not lo <= value <= hi:
        raise MalformedRequest(f"part.{name} out of range")
    return value


class Reassembler:
    """Wraps an application handler: ``part`` requests are reassembled, others pass."""

    def __init__(
        self,
        handler: Callable[[PeerIdentity, bytes], Awaitable[bytes]],
        *,
        limit_for: Callable[[str], int | None],
        max_total: Callable[[], int],
        budget: BufferBudget,
        timeout_s: float,
    ) -> None:
        self.handler, self.limit_for, self.max_total = handler, limit_for, max_total
        self.budget, self.timeout_s = budget, timeout_s
        self._pending: dict[PeerIdentity, _Pending] = {}

    def _drop(self, peer: PeerIdentity) -> None:
        state = self._pending.pop(peer, None)
        if state is not None:
            self.budget.resize(len(state.buf), 0)

    def _expire(self, now: float) -> None:
        for peer, state in list(self._pending.items()):
            if now - state.started > self.timeout_s:
                log.warning("[peer=%s] parallel request incomplete after %.0f s: dropped",
                            peer, self.timeout_s)  # fmt: skip
                self._drop(peer)

    async def __call__(self, peer: PeerIdentity, payload: bytes) -> bytes:
        try:
            kind = peek_type(payload[:64], final=True)
        except MalformedRequest:
            kind = None  # the application's own parser answers it
        if kind != PART_TYPE:
            return await self.handler(peer, payload)
        try:
            msg = msgpack.unpackb(payload, raw=False, max_bin_len=len(payload),
                                  max_str_len=64, max_array_len=0, max_map_len=16)  # fmt: skip
        except Exception as exc:
            raise MalformedRequest(f"part is not a msgpack map: {exc}") from None
        if not isinstance(msg, dict):
            raise MalformedRequest("part is not a msgpack map")
        upload_id = _field(msg, "id", bytes)
        total = _field(msg, "len", int, 1)
        count = _field(msg, "n", int, 1, MAX_PARTS)
        index = _field(msg, "i", int, 0, count - 1)
        digest, data = _field(msg, "sha", bytes), _field(msg, "data", bytes)
        if len(upload_id) != 16 or len(digest) != 32:
            raise MalformedRequest("part id must be 16 bytes and its sha 32")
        cap = self.max_total()
        if total > cap:
            raise MessageTooLarge(f"parallel request of {total} bytes exceeds {cap}")
        self._expire(time.monotonic())
        state = self._pending.get(peer)
        if state is not None and state.id != upload_id:
            self._drop(peer)  # one message in reassembly per peer: a new one replaces it
            state = None
        if state is None:
            if not self.budget.resize(0, total, ceiling=cap):
                raise ServerBusy("server buffer budget exhausted; retry later")
            state = _Pending(upload_id, count, digest, bytearray(total), time.monotonic())
            self._pending[peer] = state
        size = -(-total // count)
        start = index * size
        want = max(0, min(size, total - start))
        if (count, digest, len(state.buf)) != (state.count, state.digest, total):
            self._drop(peer)
            raise MalformedRequest("part disagrees with the message it belongs to")
        if index in state.seen or len(data) != want:
            self._drop(peer)
            raise MalformedRequest(f"part {index} seen twice or of the wrong size")
        state.buf[start : start + want] = data
        state.seen.add(index)
        if len(state.seen) < count:
            return PART_ACK
        whole = bytes(state.buf)
        self._drop(peer)
        if hashlib.sha256(whole).digest() != digest:
            raise MalformedRequest("reassembled request does not match its SHA-256")
        inner = peek_type(whole[:64], final=True)
        limit = None if inner is None or inner == PART_TYPE else self.limit_for(inner)
        if limit is None or total > limit:
            raise MessageTooLarge(f"reassembled {inner!r} of {total} bytes is not accepted")
        return bytes(await self.handler(peer, whole))


# ----------------------------------------------------------------------------- client


def _send_part(
    files: tuple[str, str, str, str, str | None],
    role: str,
    host: str,
    port: int,
    config: TransportConfig,
    part: bytes,
    protocol: str,
) -> tuple[str, bytes, str, str, str | None]:
    """Worker process: one connection, one part. Returns ("ok", body, …) or
    ("remote", b"", code, message, reason) or ("error", b"", text, "", None)."""
    from secure_xfl.transport.dial import client_for
    from secure_xfl.transport.errors import RemoteError

    cert, key, ca, federation, crl = files
    tls = TlsIdentity(cert=cert, key=key, ca_cert=ca, federation=federation, crl_path=crl)

    async def go() -> bytes:
        async with client_for(protocol, tls, role, host, port, config) as c:
            return bytes(await c.call(part))

    try:
        return "ok", asyncio.run(go()), "", "", None
    except RemoteError as exc:
        return "remote", b"", exc.code, exc.message, exc.reason
    except Exception as exc:  # reported to the parent, which raises it typed
        return "error", b"", f"{type(exc).__name__}: {exc}", "", None


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    """This process's ``workers`` part senders: started on the first parallel call (a
    spawned interpreter costs ~1 s) and kept for the next; shut down at exit."""
    pool = _POOLS.get(workers)
    if pool is None:
        if not _POOLS:
            atexit.register(shutdown_pools)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        _POOLS[workers] = pool
    return pool


def shutdown_pools() -> None:
    """Stop the part-sender processes (also run at exit)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


async def parallel_call(
    *,
    tls: TlsIdentity,
    server_role: str,
    host: str,
    port: int,
    config: TransportConfig,
    payload: bytes,
    workers: int,
    protocol: str = "quic",
) -> bytes:
    """Send ``payload`` as ``workers`` parts over as many connections in worker processes;
    returns the reply of the reassembled request (raw reply bytes, status byte first)."""
    from secure_xfl.transport.errors import RemoteError, TransportError

    paths = (tls.cert, tls.key, tls.ca_cert)
    if not all(isinstance(p, str | os.PathLike) for p in paths):
        raise TransportError("parallel requests need the identity as files (a kit)")
    crl = None if tls.crl_path is None else os.fspath(tls.crl_path)
    cert, key, ca = (str(os.fspath(p)) for p in paths)  # type: ignore[arg-type]
    files = (cert, key, ca, tls.federation, crl)
    parts = split(payload, workers)
    loop = asyncio.get_running_loop()
    pool = _pool(workers)
    try:
        results = await asyncio.gather(*(
            loop.run_in_executor(pool, _send_part, files, server_role, host, port, config, p,
                                 protocol)
            for p in parts
        ))  # fmt: skip
    except BrokenProcessPool as exc:  # a worker died: the next call starts a fresh pool
        _POOLS.pop(workers, None)
        raise TransportError(f"a parallel worker died: {exc}") from exc
    replies = []
    for status, body, code, message, reason in results:
        if status == "remote":
            raise RemoteError(code, message, reason)
        if status != "ok":
            raise TransportError(f"a parallel part failed: {code}")
        replies.append(body)
    final = [r for r in replies if r != PART_ACK]
    if len(final) != 1:
        raise TransportError(f"{len(final)} final replies to a parallel request, expected 1")
    return final[0]
