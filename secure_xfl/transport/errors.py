"""Transport-layer errors (all :class:`~secure_xfl.errors.TransportError`).

:class:`PeerRejected` lives in :mod:`secure_xfl.crypto.pki` (it is raised by
``verify_peer``, which the PKI owns, and is a ``CryptoError``); it is re-exported
here because transport callers meet it most often.
"""

from __future__ import annotations

from secure_xfl.crypto.pki import PeerRejected
from secure_xfl.errors import TransportError

__all__ = [
    "CallTimeout",
    "ConnectionClosed",
    "HandshakeFailed",
    "MalformedRequest",
    "MessageTooLarge",
    "PeerRejected",
    "RemoteError",
    "ServerBusy",
    "StreamReset",
    "StreamTimeout",
    "TooManyConnections",
    "TransportError",
    "UnsupportedAioquic",
]


class HandshakeFailed(TransportError):
    """The QUIC/TLS handshake did not complete, or the peer refused our certificate.

    ``refusal`` tells a refused certificate (or another TLS failure), which retrying
    cannot fix, from a handshake that merely did not finish (no response, timeout,
    closed for load), which it may: a :data:`~secure_xfl.crypto.pki.REJECT_REASONS`
    reason when we refused the peer or the peer named its reason (``"wrong_role"``,
    ``"revoked"``, ...), else the TLS alert's name (``"bad_certificate"``); None when
    no certificate was refused and no TLS alert was raised.
    """

    code = "handshake_failed"

    def __init__(self, message: str = "", *, refusal: str | None = None) -> None:
        self.refusal = refusal
        super().__init__(message)


class TooManyConnections(HandshakeFailed):
    """The server closed the connection after verifying us: this identity already has
    ``max_connections_per_peer`` connections open."""

    code = "too_many_connections"


class ConnectionClosed(TransportError):
    """The connection closed (idle timeout, peer close, local close) while in use."""

    code = "connection_closed"


class MessageTooLarge(TransportError):
    """A message exceeded ``max_message_bytes`` or its type's limit."""

    code = "message_too_large"


class MalformedRequest(TransportError):
    """A request's first bytes are not ``{"t": <short str>, ...}``, or name a message type
    the endpoint does not accept (refused before it is buffered)."""

    code = "protocol"


class ServerBusy(TransportError):
    """Refused for load, not content: too many requests in flight on the connection, or
    the server's buffer budget (``max_buffered_bytes``) is spent. Retry later."""

    code = "busy"


class StreamTimeout(TransportError):
    """A stream made no progress for ``stream_timeout_s``, or a request arrived slower
    than ``min_request_rate_bytes_s``, and was reset."""

    code = "stream_timeout"


class CallTimeout(TransportError):
    """A call did not complete within the caller's ``timeout``."""

    code = "timeout"


class StreamReset(TransportError):
    """The peer reset the stream (``error_code`` is the QUIC application error)."""

    code = "stream_reset"

    def __init__(self, error_code: int, message: str = "") -> None:
        self.error_code = error_code
        super().__init__(message or f"stream reset by peer (error {error_code})")


class RemoteError(TransportError):
    """The remote handler replied with an error; ``code`` is the remote error code and
    ``reason`` the refusal rule when the remote named one (e.g. ``noise_too_low``)."""

    code = "remote"

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        super().__init__(f"{code}: {message}")


class UnsupportedAioquic(TransportError):
    """The installed aioquic is outside the range the mTLS extension was tested on."""

    code = "unsupported_aioquic"
