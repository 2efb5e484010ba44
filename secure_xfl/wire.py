"""Bounded msgpack decoding shared by every parser of untrusted bytes.

msgpack checks each declared length against these limits *before* allocating,
so a hostile length field costs nothing; ext types (arbitrary objects) are off.
"""

from __future__ import annotations

from typing import Any

import msgpack

from secure_xfl.errors import SecureXFLError


def bounded_unpack(
    data: bytes | bytearray | memoryview,
    *,
    error: type[SecureXFLError],
    what: str,
    max_bin_len: int,
    max_str_len: int,
    max_array_len: int,
    max_map_len: int,
) -> Any:
    """Decode ``data`` under the given limits; any failure becomes ``error``."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bin_len,
            max_str_len=max_str_len,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise error(f"malformed {what}: {type(exc).__name__}") from None
