"""Peer's failure classification and its backoff/deadline schedule (no real waiting)."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
from aioquic.quic import events

from secure_xfl.crypto.pki import PeerRejected
from secure_xfl.protocol import messages
from secure_xfl.protocol.messages import ProtocolError
from secure_xfl.services.runtime import (
    Backoff,
    Failure,
    GaveUp,
    Peer,
    PermanentFailure,
    classify,
    failure_cause,
)
from secure_xfl.transport import RpcServer, TransportConfig
from secure_xfl.transport.dial import _open
from secure_xfl.transport.errors import (
    CallTimeout,
    ConnectionClosed,
    HandshakeFailed,
    MessageTooLarge,
    RemoteError,
    ServerBusy,
    StreamReset,
    StreamTimeout,
    TooManyConnections,
)
from secure_xfl.transport.rpc import _tls_refusal
from tests.rpc_harness import Harness

# -- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind", "cause"),
    [
        (HandshakeFailed("server certificate refused", refusal="wrong_role"), "permanent",
         "wrong_role"),
        (HandshakeFailed("closed (error 0x12c)", refusal="revoked"), "permanent", "revoked"),
        (HandshakeFailed("closed", refusal="bad_certificate"), "permanent", "bad_certificate"),
        (HandshakeFailed("no handshake within 10.0s"), "transient", "handshake_failed"),
        (TooManyConnections("too many connections"), "transient", "too_many_connections"),
        (RemoteError("not_enrolled", "'c9' is not enrolled"), "permanent", "not_enrolled"),
        (RemoteError("busy", "buffer budget exhausted"), "transient", "busy"),
        (RemoteError("round_closed", "round 2 is closed"), "refused", "round_closed"),
        (RemoteError("decryption_refused", "budget"), "refused", "decryption_refused"),
        (PeerRejected("expired"), "permanent", "expired"),
        (ConnectionClosed("idle timeout"), "transient", "connection_closed"),
        (CallTimeout("slow"), "transient", "timeout"),
        (StreamReset(0x104), "transient", "stream_reset"),
        (StreamTimeout("stalled"), "transient", "stream_timeout"),
        (ServerBusy("later"), "transient", "busy"),
        (ConnectionRefusedError(111, "refused"), "transient", "ConnectionRefusedError"),
        (TimeoutError(), "transient", "TimeoutError"),
        (MessageTooLarge("big"), "refused", "message_too_large"),
        (ProtocolError("bad reply"), "refused", "protocol"),
    ],
)  # fmt: skip
def test_classify(exc: BaseException, kind: str, cause: str) -> None:
    assert classify(exc) is Failure(kind)
    assert failure_cause(exc) == cause


def test_permanent_failure_names_its_cause() -> None:
    exc = PermanentFailure("aggregator at 127.0.0.1:1", HandshakeFailed("x", refusal="wrong_role"))
    assert exc.cause == "wrong_role"
    assert classify(exc) is Failure.PERMANENT
    assert "wrong role" in str(exc) and "127.0.0.1:1" in str(exc)


def _closed(code: int, phrase: str, frame_type: int | None = 6) -> events.ConnectionTerminated:
    return events.ConnectionTerminated(error_code=code, frame_type=frame_type, reason_phrase=phrase)


def test_tls_alerts_are_refusals_application_closes_are_not() -> None:
    assert _tls_refusal(_closed(0x131, "peer certificate refused: wrong_role")) == "wrong_role"
    assert _tls_refusal(_closed(0x12C, "peer certificate refused: revoked")) == "revoked"
    assert _tls_refusal(_closed(0x174, "peer certificate required")) == "no_certificate"
    assert _tls_refusal(_closed(0x12A, "unable to get local issuer")) == "bad_certificate"
    # "too many connections" (0x103) is an application close: same numeric range
    assert _tls_refusal(_closed(0x103, "too many connections", frame_type=None)) is None
    assert _tls_refusal(_closed(0x2, "handshake timeout")) is None  # CONNECTION_REFUSED
    assert _tls_refusal(None) is None


# -- backoff and deadline ------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when someone sleeps (or a fake attempt takes time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_backoff_doubles_with_jitter_caps_and_gives_up_at_the_deadline() -> None:
    t = FakeTime()
    jitters: Iterator[float] = iter([0.5, 0.0, 0.99] + [0.5] * 100)
    backoff = Backoff(30.0, clock=t.clock, sleep=t.sleep, jitter=lambda: next(jitters))
    failure = HandshakeFailed("no handshake")

    async def body() -> GaveUp:
        while True:
            try:
                await backoff.wait("aggregator at h:1", failure)
            except GaveUp as exc:
                return exc

    gave_up = asyncio.run(body())
    # delay 0.2 x (0.5 + jitter): 0.2, 0.2, 0.8 x 1.49, then doubling, capped at 5 s
    assert t.sleeps[:4] == pytest.approx([0.2, 0.4 * 0.5, 0.8 * 1.49, 1.6])
    assert max(t.sleeps) == pytest.approx(5.0)
    # The last pause is cut short so one last attempt falls on the deadline: a peer
    # whose attempts fail instantly is still tried for the whole window.
    assert sum(t.sleeps) == pytest.approx(30.0)
    assert gave_up.attempts == len(t.sleeps) + 1
    assert gave_up.last is failure
    assert str(gave_up).startswith(f"gave up after {gave_up.elapsed_s:.1f} s: aggregator at h:1")
    assert classify(gave_up) is Failure.TRANSIENT  # what it wraps was transient


class FakeClient:
    """Stands in for RpcClient: each connect/call pops the next scripted outcome."""

    def __init__(self, script: list[Any], t: FakeTime, log: list[str]) -> None:
        self.script, self.t, self.log = script, t, log

    async def connect(self, *, timeout: float | None = None) -> None:
        self.log.append(f"connect {timeout:.1f}")
        outcome = self.script.pop(0)
        if isinstance(outcome, BaseException):
            if isinstance(outcome, HandshakeFailed) and outcome.refusal is None:
                self.t.now += timeout or 0.0  # a handshake timeout uses the whole budget
            raise outcome

    async def call(self, payload: bytes, *, timeout: float | None = None) -> bytes:
        self.log.append("call")
        outcome = self.script.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, bytes)
        return outcome

    async def close(self) -> None:
        self.log.append("close")


def _peer(script: list[Any], deadline: float = 3.0) -> tuple[Peer, FakeTime, list[str]]:
    t, log = FakeTime(), []
    peer = Peer(
        tls=None,  # type: ignore[arg-type]
        role="aggregator",
        address="127.0.0.1:4433",
        config=TransportConfig(connect_deadline_s=deadline, handshake_timeout_s=10.0),
        clock=t.clock,
        sleep=t.sleep,
        jitter=lambda: 0.5,
    )

    async def fake_dial(timeout: float) -> FakeClient:
        # Connected as dial() does, and closed on failure: the same _open.
        return cast(FakeClient, await _open(FakeClient(script, t, log), timeout))  # type: ignore[arg-type]

    peer._dial = fake_dial  # type: ignore[assignment,method-assign]
    return peer, t, log


WELCOME = messages.encode("welcome", run="r")


def test_permanent_failure_is_not_retried() -> None:
    peer, t, log = _peer([HandshakeFailed("server certificate refused", refusal="wrong_role")])
    with pytest.raises(PermanentFailure) as info:
        asyncio.run(peer.call("hello", expect={"welcome"}))
    assert info.value.cause == "wrong_role"
    assert log == ["connect 3.0", "close"] and t.sleeps == []


def test_not_enrolled_reply_is_a_permanent_failure() -> None:
    peer, t, _ = _peer([None, RemoteError("not_enrolled", "not enrolled")])
    with pytest.raises(PermanentFailure) as info:
        asyncio.run(peer.call("hello", expect={"welcome"}))
    assert info.value.cause == "not_enrolled" and t.sleeps == []


def test_a_refused_request_reaches_the_caller_unchanged() -> None:
    refusal = RemoteError("round_closed", "round 3 is closed")
    peer, t, log = _peer([None, refusal])
    with pytest.raises(RemoteError) as info:
        asyncio.run(peer.call("hello", expect={"welcome"}))
    assert info.value is refusal and t.sleeps == []
    assert "close" not in log  # the connection is fine and kept


def test_unreachable_peer_gives_up_at_the_deadline() -> None:
    # every attempt times out; each connect gets only what is left of the 3 s deadline
    peer, t, log = _peer([HandshakeFailed("no handshake")] * 10)
    with pytest.raises(GaveUp) as info:
        asyncio.run(peer.call("hello", expect={"welcome"}))
    assert log[0] == "connect 3.0"
    assert info.value.elapsed_s == pytest.approx(3.0)
    assert t.now - 1000.0 == pytest.approx(3.0)
    assert str(info.value).startswith("gave up after 3.0 s: aggregator at 127.0.0.1:4433")


def test_busy_and_dropped_connections_are_retried_with_backoff() -> None:
    script: list[Any] = [
        ConnectionRefusedError(111, "refused"),  # connect fails fast
        None,  # connect
        RemoteError("busy", "later"),  # call: busy, connection kept
        ConnectionClosed("idle"),  # call: dropped
        None,  # reconnect
        WELCOME,  # call succeeds
    ]
    peer, t, log = _peer(script, deadline=60.0)
    reply = asyncio.run(peer.call("hello", expect={"welcome"}))
    assert reply["t"] == "welcome"
    assert t.sleeps == pytest.approx([0.2, 0.4, 0.8])
    assert log == [
        "connect 60.0", "close",
        "connect 59.8", "call", "call", "close",
        "connect 58.6", "call",
    ]  # fmt: skip


# -- real sockets, in process --------------------------------------------------------------

H = Harness("retry")
FAST = TransportConfig(handshake_timeout_s=0.3, connect_deadline_s=0.8)


def test_wrong_role_is_permanent_over_a_real_connection() -> None:
    async def main() -> PermanentFailure:
        server = RpcServer(
            tls=H.identity("keyholder", "kh"),
            allowed_roles=["aggregator"],
            handler=None,  # type: ignore[arg-type]
            config=FAST,
        )
        port = await server.start("127.0.0.1", 0)
        peer = Peer(
            tls=H.identity("client", "c1"),
            role="aggregator",
            address=f"127.0.0.1:{port}",
            config=FAST,
        )
        try:
            with pytest.raises(PermanentFailure) as info:
                await peer.call("hello", expect={"welcome"})
            return info.value
        finally:
            await server.close()

    exc = asyncio.run(main())
    assert exc.cause == "wrong_role"


def test_closed_port_gives_up_without_unretrieved_futures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> GaveUp:
        peer = Peer(
            tls=H.identity("client", "c1"), role="aggregator", address="127.0.0.1:9", config=FAST
        )
        with pytest.raises(GaveUp) as info:
            await peer.call("hello", expect={"welcome"})
        await asyncio.sleep(0.05)
        return info.value

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        exc = asyncio.run(main())
        gc.collect()  # "never retrieved" is reported when the future is collected
    assert exc.attempts >= 1
    assert "no handshake within" in str(exc)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
