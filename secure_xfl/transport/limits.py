"""Per-request memory limits on a server: the message type peeked from a request's first
bytes, per-type size limits, and the server-wide budget for buffered request bytes.

Application messages are msgpack maps whose first key is ``"t"`` (the message type,
see ``secure_xfl.protocol.messages.encode``). The transport sits below the protocol
layer and never imports it; it reads only the map header and the first key/value
pair from at most :data:`PREFIX_BYTES` bytes, so it can apply the type's size limit
while the rest of the request is still arriving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from secure_xfl.transport.errors import MalformedRequest

__all__ = [
    "MAX_TYPE_LEN",
    "PREFIX_BYTES",
    "BufferBudget",
    "Limits",
    "head",
    "limits_table",
    "peek_type",
]

#: The type must be known within this many bytes, or the request is refused.
PREFIX_BYTES = 64
#: Longest message type name accepted in the prefix.
MAX_TYPE_LEN = 32

Limits = Callable[[str], int]
"""Message type -> largest acceptable request in bytes; raise ``KeyError`` (or return
0) for a type the endpoint does not accept."""


def head(chunks: Iterable[bytes], n: int = PREFIX_BYTES) -> bytes:
    """The first ``n`` bytes of a message buffered as ``chunks``."""
    out = b""
    for chunk in chunks:
        out += chunk[: n - len(out)]
        if len(out) >= n:
            break
    return out


def _str_at(buf: bytes, pos: int, what: str) -> tuple[str | None, int]:
    """A msgpack str at ``pos``: (value, next pos), or (None, pos) if cut off."""
    if pos >= len(buf):
        return None, pos
    tag = buf[pos]
    if 0xA0 <= tag <= 0xBF:
        size, start = tag & 0x1F, pos + 1
    elif tag in (0xD9, 0xDA, 0xDB):
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[tag]
        if pos + 1 + width > len(buf):
            return None, pos
        size, start = int.from_bytes(buf[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
    else:
        raise MalformedRequest(f"request {what} is not a string")
    if size > MAX_TYPE_LEN:
        raise MalformedRequest(f"request {what} is longer than {MAX_TYPE_LEN} bytes")
    if start + size > len(buf):
        return None, pos
    try:
        return buf[start : start + size].decode("utf-8"), start + size
    except UnicodeDecodeError:
        raise MalformedRequest(f"request {what} is not UTF-8") from None


def peek_type(prefix: bytes, *, final: bool = False) -> str | None:
    """The message type of a request from its first bytes.

    Returns None when more bytes are needed; raises :class:`MalformedRequest` when the
    prefix is not ``{"t": <str of at most MAX_TYPE_LEN bytes>, ...}`` or the type is
    still unknown although the request ended (``final``) or :data:`PREFIX_BYTES`
    bytes arrived.
    """
    buf = bytes(prefix[:PREFIX_BYTES])
    final = final or len(prefix) >= PREFIX_BYTES
    result: str | None = None
    if buf:
        tag = buf[0]
        if 0x81 <= tag <= 0x8F:
            pos: int | None = 1
        elif tag in (0xDE, 0xDF):
            width = 2 if tag == 0xDE else 4
            pos = None
            if len(buf) >= 1 + width:
                if int.from_bytes(buf[1 : 1 + width], "big") == 0:
                    raise MalformedRequest("request is an empty map")
                pos = 1 + width
        elif tag == 0x80:
            raise MalformedRequest("request is an empty map")
        else:
            raise MalformedRequest("request is not a msgpack map")
        if pos is not None:
            key, pos = _str_at(buf, pos, "first key")
            if key is not None and key != "t":
                raise MalformedRequest('request\'s first key is not "t"')
            if key is not None:
                result, _ = _str_at(buf, pos, "type")
    if result is None and final:
        raise MalformedRequest(f'no {{"t": type}} within the first {PREFIX_BYTES} bytes')
    return result


def limits_table(table: Mapping[str, int | Callable[[], int]]) -> Limits:
    """A :data:`Limits` from fixed sizes and callables (re-evaluated per request)."""
    frozen = dict(table)

    def limit(msg_type: str) -> int:
        value = frozen[msg_type]
        return value() if callable(value) else value

    return limit


class BufferBudget:
    """Bytes claimed by requests being received or handled, server-wide.

    ``resize`` grows or shrinks one request's claim; growing fails (and changes
    nothing) when the total would pass ``max(limit, ceiling)``, ``ceiling`` being
    that request's own size limit, so the largest acceptable request always fits an
    otherwise idle server.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def resize(self, held: int, want: int, *, ceiling: int = 0) -> bool:
        """Change a claim of ``held`` bytes to ``want``; False when it does not fit."""
        delta = want - held
        if delta > 0 and self.used + delta > max(self.limit, ceiling):
            return False
        self.used += delta
        self.peak = max(self.peak, self.used)
        return True
