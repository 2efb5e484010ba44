"""Update codec: layout, flatten/unflatten, chunking, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_xfl.crypto.codec import (
    chunk_lengths,
    chunks,
    encrypt_vector,
    flatten,
    layout_of,
    load_chunk,
    unflatten,
)
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.errors import CodecError, EnvelopeError, LayoutMismatch
from tests.conftest import contexts

shapes = st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple)


@given(
    st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=12), shapes, min_size=1, max_size=6)
)
@settings(max_examples=50, deadline=None)
def test_flatten_unflatten_round_trip(spec: dict[str, tuple[int, ...]]) -> None:
    tensors = {k: torch.randn(s, dtype=torch.float32) for k, s in spec.items()}
    layout = layout_of(tensors)
    vec = flatten(tensors, layout)
    assert vec.shape == (layout.numel,)
    back = unflatten(vec, layout)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k], t)


def test_layout_is_order_independent_and_digest_sensitive() -> None:
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    b = {"y": torch.zeros(4), "x": torch.zeros(2, 3)}
    assert layout_of(a).digest == layout_of(b).digest
    c = {"x": torch.zeros(3, 2), "y": torch.zeros(4)}
    d = {"x": torch.zeros(2, 3), "y": torch.zeros(4, dtype=torch.float64)}
    assert len({layout_of(a).digest, layout_of(c).digest, layout_of(d).digest}) == 3
    with pytest.raises(LayoutMismatch):
        layout_of(a).check(layout_of(c).digest)


@pytest.mark.parametrize("numel", [1, 2047, 2048, 2049, 10_000_000])
def test_any_length_chunks_and_restores(numel: int) -> None:
    slots = get_preset("xfl-default").slots
    tensors = {"w": torch.arange(numel, dtype=torch.float32)}
    layout = layout_of(tensors)
    vec = flatten(tensors, layout)
    lens = chunk_lengths(numel, slots)
    assert sum(lens) == numel and all(0 < n <= slots for n in lens)
    assert [c.shape[0] for c in chunks(vec, slots)] == lens
    back = unflatten(np.concatenate(list(chunks(vec, slots))), layout)
    assert torch.equal(back["w"], tensors["w"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused(bad: float) -> None:
    t = {"w": torch.tensor([1.0, bad])}
    with pytest.raises(CodecError, match="NaN or Inf"):
        flatten(t, layout_of(t))


def test_empty_updates_are_refused() -> None:
    with pytest.raises(CodecError):
        layout_of({})
    with pytest.raises(CodecError):
        layout_of({"w": torch.zeros(0)})


def test_integer_tensors_are_refused() -> None:
    with pytest.raises(CodecError, match="floating point"):
        layout_of({"w": torch.zeros(3, dtype=torch.int64)})


def test_layout_mismatch_on_flatten_and_unflatten() -> None:
    layout = layout_of({"w": torch.zeros(4)})
    with pytest.raises(LayoutMismatch):
        flatten({"w": torch.zeros(5)}, layout)
    with pytest.raises(LayoutMismatch):
        unflatten(np.zeros(3), layout)


def test_encrypted_chunks_decrypt_to_the_input() -> None:
    secret, public = contexts()
    preset = get_preset("xfl-default")
    vec = np.random.default_rng(1).normal(size=5000)
    blobs = encrypt_vector(public, vec, preset)
    assert len(blobs) == 3
    loaded = [
        load_chunk(secret, b, preset, expected_len=n)
        for b, n in zip(blobs, chunk_lengths(5000, preset.slots), strict=True)
    ]
    out = np.concatenate([np.array(v.decrypt()) for v in loaded])
    assert np.abs(out - vec).max() < preset.error_bound(float(np.abs(vec).max()), 1)


def test_load_chunk_rejects_wrong_length_empty_and_foreign_parameters() -> None:
    _, public = contexts()
    preset = get_preset("xfl-default")
    blob = encrypt_vector(public, np.ones(10), preset)[0]
    with pytest.raises(EnvelopeError):
        load_chunk(public, blob, preset, expected_len=11)
    with pytest.raises(EnvelopeError):
        load_chunk(public, b"", preset, expected_len=10)
    _, other = contexts("nvflare-default")
    foreign = encrypt_vector(other, np.ones(10), get_preset("nvflare-default"))[0]
    with pytest.raises(EnvelopeError):
        load_chunk(public, foreign, preset, expected_len=10)
