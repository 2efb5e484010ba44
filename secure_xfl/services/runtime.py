"""What every long-running role shares: logging, signals, addresses, calls with backoff
(permanent failures told from transient ones)."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Literal

from secure_xfl.errors import ConfigError, TransportError
from secure_xfl.protocol import messages
from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.dial import Client, dial
from secure_xfl.transport.errors import (
    CallTimeout,
    ConnectionClosed,
    HandshakeFailed,
    PeerRejected,
    RemoteError,
    ServerBusy,
    StreamReset,
    StreamTimeout,
)
from secure_xfl.transport.parts import parallel_call
from secure_xfl.transport.tcp import TlsRpcClient

log = logging.getLogger(__name__)


class _KeyValueFormatter(logging.Formatter):
    """``time level role logger: message`` lines, or one JSON object per line."""

    def __init__(self, role: str, as_json: bool) -> None:
        super().__init__()
        self.role = role
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        # Milliseconds: a round's steps (download, seal, upload, decrypt) are sub-second.
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}"
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(
                {
                    "time": ts,
                    "level": record.levelname,
                    "role": self.role,
                    "logger": record.name,
                    "msg": msg,
                }
            )
        return f"{ts} {record.levelname:<7} {self.role} {record.name}: {msg}"


def setup_logging(role: str, *, level: str = "INFO", as_json: bool = False) -> None:
    """Configure the root logger for one service process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(role, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's per-packet chatter


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set ``stop`` so services finish their current step and exit."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


class Failure(enum.Enum):
    """What a failed connect or call means for the caller (see :func:`classify`)."""

    PERMANENT = "permanent"
    """Connecting or authenticating cannot succeed by retrying: a certificate refused
    (by us or by the peer), the peer is not of the expected role, this party is not
    enrolled or is revoked, another TLS failure. Raised at once as
    :class:`PermanentFailure`."""
    TRANSIENT = "transient"
    """The peer may answer later: no response, handshake timeout, connection refused or
    dropped, a call timed out, ``busy``. Retried with backoff until the deadline."""
    REFUSED = "refused"
    """The peer answered and refused this request (``round_closed``, ``plan_mismatch``,
    ``decryption_refused``, ...): the connection is fine and retrying the same request
    would not help; the caller decides (it gets the :class:`RemoteError`)."""


#: Remote error codes that are a permanent authentication failure of this party.
PERMANENT_REMOTE_CODES = frozenset({"not_enrolled", "peer_rejected"})
#: Remote error codes that only mean "not now".
TRANSIENT_REMOTE_CODES = frozenset({"busy"})

_TRANSIENT_ERRORS = (
    ConnectionClosed,
    CallTimeout,
    StreamReset,
    StreamTimeout,
    ServerBusy,
    TimeoutError,
    OSError,  # connection refused, unreachable network, name resolution
)


def classify(exc: BaseException) -> Failure:
    """Tell a permanent failure from a transient one (and from a refused request)."""
    if isinstance(exc, PermanentFailure | PeerRejected):
        return Failure.PERMANENT
    if isinstance(exc, HandshakeFailed):  # TooManyConnections: refusal is None
        return Failure.TRANSIENT if exc.refusal is None else Failure.PERMANENT
    if isinstance(exc, RemoteError):
        if exc.code in PERMANENT_REMOTE_CODES:
            return Failure.PERMANENT
        return Failure.TRANSIENT if exc.code in TRANSIENT_REMOTE_CODES else Failure.REFUSED
    if isinstance(exc, (GaveUp, *_TRANSIENT_ERRORS)):  # GaveUp: transient, out of time
        return Failure.TRANSIENT
    return Failure.REFUSED  # e.g. a message too large, a malformed reply: not the network


def failure_cause(exc: BaseException) -> str:
    """A short machine-readable cause: the refusal reason, remote code or error code."""
    if isinstance(exc, PermanentFailure):
        return exc.cause
    if isinstance(exc, HandshakeFailed) and exc.refusal is not None:
        return exc.refusal
    if isinstance(exc, PeerRejected):
        return exc.reason
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else type(exc).__name__


class PermanentFailure(TransportError):
    """A peer cannot be reached or authenticated and retrying cannot change that;
    ``cause`` names why (``wrong_role``, ``revoked``, ``not_enrolled``, ...)."""

    code = "permanent_failure"

    def __init__(self, peer: str, error: BaseException) -> None:
        self.peer = peer
        self.cause = failure_cause(error)
        self.error = error
        super().__init__(f"{peer}: {_CAUSES.get(self.cause, self.cause)} ({error})")


class GaveUp(TransportError):
    """Transient failures went on past the deadline; ``last`` is the last of them."""

    code = "gave_up"

    def __init__(self, peer: str, elapsed_s: float, attempts: int, last: BaseException) -> None:
        self.peer = peer
        self.elapsed_s = elapsed_s
        self.attempts = attempts
        self.last = last
        super().__init__(
            f"gave up after {elapsed_s:.1f} s: {peer}: {last} "
            f"({attempts} attempt{'s' if attempts != 1 else ''})"
        )


#: Plain words for the usual permanent causes (log lines).
_CAUSES = {
    "wrong_role": "wrong role: the peer's certificate is not of the role expected at this "
    "address (wrong port?)",
    "wrong_federation": "the peer belongs to another federation",
    "untrusted": "certificate not issued by the federation CA",
    "bad_certificate": "certificate refused",
    "unknown_ca": "certificate not issued by the federation CA",
    "access_denied": "refused by the peer (wrong role or federation)",
    "expired": "certificate expired",
    "certificate_expired": "certificate expired",
    "not_yet_valid": "certificate not yet valid",
    "revoked": "certificate revoked",
    "certificate_revoked": "certificate revoked",
    "no_certificate": "no certificate presented",
    "not_enrolled": "this party is not enrolled in the run",
}


class Backoff:
    """Exponential backoff with jitter, bounded by a deadline from the first attempt.

    ``clock``, ``sleep`` and ``jitter`` are injectable so the schedule can be tested
    without waiting.
    """

    def __init__(
        self,
        deadline_s: float,
        *,
        initial_s: float = 0.2,
        max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.clock, self.sleep, self.jitter = clock, sleep, jitter
        self.start = clock()
        self.deadline = self.start + deadline_s
        self.delay = initial_s
        self.max_s = max_s
        self.attempts = 0
        """Failed attempts so far."""

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - self.clock())

    async def wait(self, peer: str, failure: BaseException) -> None:
        """After a transient failure: sleep ``delay x [0.5, 1.5)`` (doubling, capped, and
        cut short so one last attempt falls on the deadline), or raise :class:`GaveUp`
        once the deadline has passed: the peer is tried for the whole window, however
        fast each attempt fails."""
        self.attempts += 1
        now = self.clock()
        if now >= self.deadline:
            raise GaveUp(peer, now - self.start, self.attempts, failure) from failure
        pause = min(self.delay * (0.5 + self.jitter()), self.deadline - now)
        log.info(
            "%s: %s; attempt %d failed, retrying in %.1fs (giving up in %.0fs)",
            peer,
            failure,
            self.attempts,
            pause,
            self.deadline - now,
        )
        await self.sleep(pause)
        self.delay = min(self.delay * 2, self.max_s)


class Peer:
    """A reconnecting RPC client that knows a permanent failure from a transient one.

    Transient failures (see :func:`classify`) are retried with exponential backoff and
    jitter until ``max_wait_s`` (default: the transport's ``connect_deadline_s``), then
    :class:`GaveUp` is raised; permanent ones raise :class:`PermanentFailure` at once;
    a request the peer refused raises its :class:`RemoteError`. A peer that goes away
    (a restart) is thus ridden out for that window; :attr:`connections` counts the
    connections made, so a caller can tell that a reply came over a new one (from what
    may be a new process).
    """

    def __init__(
        self,
        *,
        tls: TlsIdentity,
        role: str,
        address: str,
        config: TransportConfig,
        max_wait_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.tls = tls
        self.role = role
        self.host, self.port = parse_address(address)
        self.config = config
        self.max_wait_s = config.connect_deadline_s if max_wait_s is None else max_wait_s
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._client: Client | None = None
        self._prefer: Literal["tls", "quic"] | None = None
        self.connections = 0
        """Connections established so far (a reconnect increments it)."""

    @property
    def label(self) -> str:
        """``<role> at host:port`` for log lines."""
        return f"{self.role} at {self.host}:{self.port}"

    def backoff(self) -> Backoff:
        """A fresh retry schedule for one call."""
        return Backoff(self.max_wait_s, clock=self._clock, sleep=self._sleep, jitter=self._jitter)

    async def _dial(self, timeout: float) -> Client:
        """A connected client over the configured transport (closed again on failure)."""
        return await dial(tls=self.tls, server_role=self.role, host=self.host, port=self.port,
                          config=self.config, timeout=timeout, prefer=self._prefer)  # fmt: skip

    async def _connect(self, backoff: Backoff) -> Client:
        client = await self._dial(max(0.1, backoff.remaining()))
        if self.config.protocol == "auto":
            # Reconnects go straight to what worked (no waiting for the other again).
            self._prefer = "tls" if isinstance(client, TlsRpcClient) else "quic"
        return client

    async def call(
        self,
        msg_type: str,
        *,
        expect: Collection[str],
        timeout: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one message (connecting first if needed); return the decoded reply."""
        payload = messages.encode(msg_type, **fields)
        cfg = self.config
        if cfg.upload_workers > 1 and len(payload) >= cfg.parallel_min_bytes:
            reply = await self._parallel(payload)
            if reply is not None:
                return messages.decode(reply, expect=expect)
        backoff = self.backoff()
        while True:
            try:
                if self._client is None:
                    self._client = await self._connect(backoff)
                    self.connections += 1
                    if backoff.attempts:
                        log.info("%s %s after %.1f s (%d failed attempts)",
                                 "reconnected to" if self.connections > 1 else "connected to",
                                 self.label, self._clock() - backoff.start,
                                 backoff.attempts)  # fmt: skip
                reply = await self._client.call(payload, timeout=timeout)
            except (TransportError, OSError) as exc:
                kind = classify(exc)
                if kind is Failure.REFUSED:
                    raise
                if not isinstance(exc, RemoteError):
                    await self.close()  # the connection is gone or never was
                if kind is Failure.PERMANENT:
                    raise PermanentFailure(self.label, exc) from exc
                if (
                    backoff.attempts == 0 and self.connections and not isinstance(exc, RemoteError)
                ):  # once per outage of a peer we had reached: it may be restarting
                    log.warning("%s unreachable; reconnecting for up to %.0f s (%s)",
                                self.label, backoff.remaining(), exc)  # fmt: skip
                await backoff.wait(self.label, exc)
            else:
                return messages.decode(reply, expect=expect)

    async def _parallel(self, payload: bytes) -> bytes | None:
        """``payload`` in parts over ``upload_workers`` connections; None when that failed
        for a transport reason (the caller then sends it over one connection)."""
        tls = (self._prefer or self.config.protocol) == "tls" or (
            self._prefer is None and self.config.protocol == "auto" and self.config.prefer == "tls"
        )
        try:
            return await parallel_call(tls=self.tls, server_role=self.role, host=self.host,
                                       port=self.port, config=self.config, payload=payload,
                                       workers=self.config.upload_workers,
                                       protocol="tls" if tls else "quic")  # fmt: skip
        except RemoteError as exc:
            if exc.code != "busy":
                raise
            log.warning("%s is too busy for a parallel request: sending it over one "
                        "connection", self.label)  # fmt: skip
            return None
        except (TransportError, OSError) as exc:
            log.warning("parallel request to %s failed (%s): sending it over one connection",
                        self.label, exc)  # fmt: skip
            return None

    async def close(self) -> None:
        """Drop the connection (a later call reconnects)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


async def watch_crl(
    kit: Any,
    server: Any,
    stop: asyncio.Event,
    period_s: float = 2.0,
    on_change: Callable[[], None] | None = None,
) -> None:
    """Until ``stop``: reload the server's CRL whenever the kit's crl.pem changes.

    ``on_change`` runs after each reload (the aggregator re-reads its enrolment, so a
    revoked client stops counting and its uploads on a live connection are refused).
    """
    path = kit.path / "crl.pem"

    def mtime() -> float:
        return path.stat().st_mtime if path.exists() else 0.0

    seen = mtime()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except TimeoutError:
            now = mtime()
            if now != seen:
                seen = now
                server.reload_crl()  # revocations take effect without a restart
                if on_change is not None:
                    on_change()


def write_port_file(path: str | None, port: int) -> None:
    """Tell a supervisor (tests, the demo) which port a service bound."""
    if path:
        from pathlib import Path

        tmp = Path(path + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)
