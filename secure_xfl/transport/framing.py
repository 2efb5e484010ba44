"""Response framing: one status byte, then the body (ok) or a msgpack error map.

See docs/transport.md: ``0x00`` ok followed by the handler's bytes; ``0x01`` error
followed by msgpack ``{"code", "message"[, "reason"]}`` (at most 64 KiB).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from secure_xfl.errors import SecureXFLError
from secure_xfl.transport.errors import RemoteError, TransportError

__all__ = ["STATUS_ERROR", "STATUS_OK", "answer", "decode_response", "encode_error"]

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


async def answer(
    handler: Callable[[Any, bytes], Awaitable[bytes]],
    peer: Any,
    payload: bytes,
    log: logging.Logger,
    where: str,
) -> list[bytes]:
    """Run the application's handler on one verified request; the reply's parts.

    A typed refusal becomes an error reply with its code (and ``reason``); anything
    else the handler raises is logged and answered ``internal``: the server keeps
    serving whatever one request does (the QUIC and TLS servers share this).
    """
    try:
        body = await handler(peer, payload)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"handler returned {type(body).__name__}, not bytes")
        return [bytes([STATUS_OK]), bytes(body)]
    except asyncio.CancelledError:
        raise
    except SecureXFLError as exc:
        log.info("[peer=%s] handler refused request: %s (%s)", peer, exc, exc.code)
        reason = getattr(exc, "reason", None)
        return [encode_error(exc.code, str(exc), reason if isinstance(reason, str) else None)]
    except Exception:
        log.exception("[peer=%s] handler crashed on %s", peer, where)
        return [encode_error("internal", "internal server error")]
