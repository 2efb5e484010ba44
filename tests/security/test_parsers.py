"""Regressions found by the fuzzer: hostile values must never escape as untyped errors.

DESIGN §2 promise: "Bad input of any kind gets a clear error, never a crash, a hang or
an unbounded allocation." The RPC server turns any non-library exception into an
``internal`` error and a logged traceback: a crash of the request, not a clear error.
"""

from __future__ import annotations

import threading

import msgpack
import pytest

from secure_xfl.crypto.envelope import EncryptedAggregate, ProtectedUpdate
from secure_xfl.errors import SecureXFLError
from secure_xfl.protocol import messages

#: Deeper than Python's recursion limit (1000), within msgpack's unpacker stack (1024).
DEPTH = 1020
NESTED = b"\x91" * DEPTH + b"\x00"  # [[[…[0]…]]] as msgpack, built by hand


def _in_thread(fn: object, payload: bytes) -> BaseException | None:
    """Run ``fn(payload)`` in a worker thread (as the servers do) and return its error."""
    caught: list[BaseException | None] = [None]

    def target() -> None:
        try:
            fn(payload)  # type: ignore[operator]
        except BaseException as exc:
            caught[0] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return caught[0]


@pytest.mark.parametrize(
    ("parse", "payload"),
    [
        (
            messages.decode,
            b"\x82" + msgpack.packb("t") + msgpack.packb("decrypt") + b"\xa1v" + NESTED,
        ),
        (ProtectedUpdate.decode, b"\x94" + msgpack.packb("update") + NESTED + b"\x90\x90"),
        (EncryptedAggregate.decode, b"\x92" + msgpack.packb("aggregate") + NESTED),
    ],
    ids=["message", "update", "aggregate"],
)
def test_deeply_nested_version_field_gets_a_typed_error(parse: object, payload: bytes) -> None:
    """§2 "Bad input of any kind gets a clear error": a version field holding a
    1020-deep nested list is refused with the parser's typed error."""
    exc = _in_thread(parse, payload)
    assert isinstance(exc, SecureXFLError), repr(exc)[:200]
