"""Application message schema (msgpack maps) carried inside RPC frames.

Every message is a map ``{"t": type, "v": 1, ...fields}``. :func:`decode`
bounds sizes through msgpack's limits, then :func:`require` checks each field's
type and range, so handlers only ever see validated values. See
``docs/protocol.md`` for the table of messages and limits.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import msgpack
import numpy as np

from secure_xfl.errors import TransportError
from secure_xfl.wire import bounded_unpack

PROTOCOL_VERSION = 1

#: Largest message of any kind (an encrypted update of a ~7B-parameter LoRA is far below).
MAX_MESSAGE_BYTES = 2 * 1024**3
#: Bounds for the small fields.
MAX_STR = 4096
MAX_MAP = 256
MAX_ARRAY = 1_000_000
MAX_TENSORS = 100_000

MESSAGE_TYPES = frozenset(
    {
        "hello",
        "welcome",
        "task",
        "round",
        "wait",
        "done",
        "upload",
        "decline",
        "ack",
        "decrypt",
        "plain",
        "status",
        "info",
        "mask_key",
        "cohort",
        "members",
    }
)

_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


class ProtocolError(TransportError):
    """A message is malformed, of an unknown type or version, or out of bounds."""

    code = "protocol"


def _shown(value: object) -> str:
    """A hostile value for an error message: scalars only (a deeply nested list's
    repr would recurse past Python's limit), truncated."""
    if isinstance(value, int | float | str | bool) or value is None:
        return repr(value)[:64]
    return f"<{type(value).__name__}>"


def encode(msg_type: str, **fields: Any) -> bytes:
    """Serialise one message."""
    if msg_type not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    return bytes(msgpack.packb({"t": msg_type, "v": PROTOCOL_VERSION, **fields}, use_bin_type=True))


def decode(
    data: bytes, *, expect: Collection[str] | None = None, max_bytes: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Parse and check the envelope of one message (type, version, size)."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {max_bytes}")
    obj = bounded_unpack(
        data,
        error=ProtocolError,
        what="message",
        max_bin_len=max_bytes,
        max_str_len=MAX_STR,
        max_array_len=MAX_ARRAY,
        max_map_len=max(MAX_MAP, MAX_TENSORS),
    )
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ProtocolError("message must be a map with a string 't'")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {_shown(obj.get('v'))}")
    if obj["t"] not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {obj['t']!r}")
    if expect is not None and obj["t"] not in expect:
        raise ProtocolError(
            f"unexpected message type {obj['t']!r}, expected one of {sorted(expect)}"
        )
    return obj


def require(
    msg: Mapping[str, Any],
    field: str,
    kind: type[Any],
    *,
    lo: float | None = None,
    hi: float | None = None,
    optional: bool = False,
) -> Any:
    """Fetch ``field`` with the given type (and numeric range); typed error otherwise."""
    if field not in msg or msg[field] is None:
        if optional:
            return None
        raise ProtocolError(f"missing field {field!r}")
    value: Any = msg[field]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {field!r} must be {kind.__name__}")
    if kind is float and not math.isfinite(float(value)):
        raise ProtocolError(f"field {field!r} must be finite")
    num = float(value) if kind in (int, float) else 0.0
    if (lo is not None and num < lo) or (hi is not None and num > hi):
        raise ProtocolError(f"field {field!r} out of range [{lo}, {hi}]")
    return value


def pack_tensors(tensors: Mapping[str, np.ndarray]) -> list[list[Any]]:
    """Named arrays as ``[[name, shape, dtype, raw bytes], …]`` (no pickle)."""
    out = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = str(arr.dtype)
        if dtype not in _DTYPES:
            raise ProtocolError(f"{name}: dtype {dtype} cannot be sent")
        out.append(
            [name, list(arr.shape), dtype, arr.astype(arr.dtype.newbyteorder("<")).tobytes()]
        )
    return out


def unpack_tensors(obj: object) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_tensors`, validating every shape against its byte length."""
    if not isinstance(obj, list) or not 0 < len(obj) <= MAX_TENSORS:
        raise ProtocolError("tensors must be a non-empty list")
    out: dict[str, np.ndarray] = {}
    for item in obj:
        if not isinstance(item, list) or len(item) != 4:
            raise ProtocolError("tensor entry must be [name, shape, dtype, data]")
        name, shape, dtype, raw = item
        if not isinstance(name, str) or not name or name in out:
            raise ProtocolError("tensor names must be unique non-empty strings")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
            )
        ):
            raise ProtocolError(f"{name}: bad shape")
        if dtype not in _DTYPES or not isinstance(raw, bytes):
            raise ProtocolError(f"{name}: bad dtype or data")
        np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
        if len(raw) != math.prod(shape) * np_dtype.itemsize:
            raise ProtocolError(f"{name}: {len(raw)} bytes do not fit shape {shape}")
        out[name] = np.frombuffer(raw, dtype=np_dtype).reshape(shape).astype(_DTYPES[dtype])
    return out


def pack_vector(vec: np.ndarray) -> bytes:
    """A flat float64 vector as little-endian bytes."""
    return np.ascontiguousarray(vec, dtype="<f8").tobytes()


def unpack_vector(raw: object, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_vector` with the expected length checked first."""
    if not isinstance(raw, bytes) or len(raw) != numel * 8:
        raise ProtocolError(f"vector must be {numel} float64 values")
    vec = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.isfinite(vec).all():
        raise ProtocolError("vector contains NaN or Inf")
    return vec
