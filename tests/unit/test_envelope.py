"""Envelope format: round trip and fuzzing (every malformed input → EnvelopeError)."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_xfl.crypto.envelope import EncryptedAggregate, ProtectedUpdate
from secure_xfl.crypto.errors import EnvelopeError
from tests.unit.helpers import make_accumulator, make_update

KEY = ec.generate_private_key(ec.SECP256R1())
UPDATE = make_update(KEY, "c0", np.linspace(-1, 1, 3000))
BLOB = UPDATE.encode()
AGG_BLOB = (lambda a: (a.add(UPDATE), a.result().encode())[1])(make_accumulator({"c0": KEY}, 3000))


def test_round_trip() -> None:
    again = ProtectedUpdate.decode(BLOB)
    assert again == UPDATE
    assert EncryptedAggregate.decode(AGG_BLOB).manifest[0] == UPDATE.signed


@given(st.binary(max_size=4096))
@settings(max_examples=500, deadline=None)
def test_random_bytes_are_a_typed_error(data: bytes) -> None:
    for cls in (ProtectedUpdate, EncryptedAggregate):
        with pytest.raises(EnvelopeError):
            cls.decode(data)


@given(st.integers(0, len(BLOB) - 1))
@settings(max_examples=200, deadline=None)
def test_truncations_are_a_typed_error(cut: int) -> None:
    with pytest.raises(EnvelopeError):
        ProtectedUpdate.decode(BLOB[:cut])


@given(st.integers(0, len(BLOB) * 8 - 1))
@settings(max_examples=300, deadline=None)
def test_bit_flips_are_rejected_or_detected(bit: int) -> None:
    data = bytearray(BLOB)
    data[bit // 8] ^= 1 << (bit % 8)
    try:
        out = ProtectedUpdate.decode(bytes(data))
    except EnvelopeError:
        return
    # A flip that still parses must have changed something the signature or the
    # digest covers; the accumulator then refuses it (tested in test_aggregate).
    assert out != UPDATE


def _forge(body: list[object]) -> bytes:
    return bytes(msgpack.packb(body, use_bin_type=True))


def test_huge_declared_lengths_do_not_allocate() -> None:
    # bin32 header declaring 4 GiB, array32 declaring 4 billion items, str32 huge.
    bombs = [
        b"\x94\xa6update\x01\xc6\xff\xff\xff\xff",
        b"\x94\xa6update\x01\xdd\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
    ]
    tracemalloc.start()
    for bomb in bombs:
        with pytest.raises(EnvelopeError):
            ProtectedUpdate.decode(bomb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 1024 * 1024


def test_unknown_version_and_kind_are_refused() -> None:
    obj = msgpack.unpackb(BLOB, raw=False)
    obj[1] = 2
    with pytest.raises(EnvelopeError, match="version"):
        ProtectedUpdate.decode(_forge(obj))
    obj[1], obj[0] = 1, "aggregate"
    with pytest.raises(EnvelopeError):
        ProtectedUpdate.decode(_forge(obj))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, ""),  # run
        (1, -1),  # round
        (1, True),  # round as bool
        (2, "bad id with spaces"),
        (3, b"short"),  # layout digest
        (5, 0),  # numel
        (6, float("nan")),  # weight
        (6, -1.0),
        (7, "server"),  # weighting
        (9, float("inf")),  # loss
    ],
)
def test_each_bad_field_is_refused(index: int, value: object) -> None:
    obj = msgpack.unpackb(BLOB, raw=False)
    obj[2][0][index] = value
    with pytest.raises(EnvelopeError):
        ProtectedUpdate.decode(_forge(obj))


def test_tampered_chunk_fails_the_digest() -> None:
    obj = msgpack.unpackb(BLOB, raw=False)
    chunk = bytearray(obj[3][0])
    chunk[100] ^= 0xFF
    obj[3][0] = bytes(chunk)
    with pytest.raises(EnvelopeError, match="digest"):
        ProtectedUpdate.decode(_forge(obj))


def test_extra_map_keys_and_wrong_types_are_refused() -> None:
    for body in (["update", 1, {"a": 1}, []], ["update", 1, [[], b""], []], {"update": 1}, 5):
        with pytest.raises(EnvelopeError):
            ProtectedUpdate.decode(_forge(body))  # type: ignore[arg-type]
