"""Response framing: one status byte, then the body (ok) or a msgpack error map.

See docs/transport.md: ``0x00`` ok followed by the handler's bytes; ``0x01`` error
followed by msgpack ``{"code", "message"[, "reason"]}`` (at most 64 KiB).
"""

from __future__ import annotations

import msgpack

from secure_xfl.transport.errors import RemoteError, TransportError

__all__ = ["STATUS_ERROR", "STATUS_OK", "decode_response", "encode_error"]

STATUS_OK = 0
STATUS_ERROR = 1
_MAX_ERROR_BODY = 64 << 10


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
