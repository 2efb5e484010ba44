"""Packed fast path: exact lane sums, lane isolation, error bound, strict refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.envelope import ProtectedUpdate, UpdateStatement
from secure_xfl.crypto.errors import (
    AggregationError,
    CodecError,
    DecryptionRefused,
    EnvelopeError,
)
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.packing import QuantSpec, pack, unpack_sum
from secure_xfl.privacy.dp import DPConfig, privatize
from secure_xfl.privacy.protect import protect_vector
from tests.conftest import contexts
from tests.unit.helpers import RUN, layout_for

PACKED = "xfl-packed"
DP = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=3)


def _encrypt_sum(levels: list[np.ndarray], spec: QuantSpec) -> np.ndarray:
    secret, public = contexts(PACKED)
    scale = 2.0**spec.scale_bits
    acc = None
    for q in levels:
        v = ts.ckks_vector(public, pack(q, spec).tolist(), scale)
        acc = v if acc is None else acc + v
    assert acc is not None
    acc.link_context(secret)
    return np.asarray(acc.decrypt(), dtype=np.float64)


def test_default_spec_meets_the_error_target_and_fits_three_lanes() -> None:
    spec = QuantSpec.for_dp(DP)
    assert spec.rel_error(DP) <= 0.01
    assert spec.lanes == 3
    assert spec.scale_bits + spec.lanes * spec.lane_bits <= 58


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 16),
    bits=st.integers(4, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_ckks_sums_of_packed_integers_are_exact(n: int, bits: int, seed: int) -> None:
    spec = QuantSpec(bits=bits, max_clients=16, range=1.0)
    rng = np.random.default_rng(seed)
    m = 2048 * spec.lanes - int(rng.integers(0, 100))
    levels = [rng.integers(0, spec.levels + 1, m) for _ in range(n)]
    got = unpack_sum(_encrypt_sum(levels, spec), spec, n, m)
    want = sum(q.astype(np.float64) for q in levels) * spec.step - n * spec.range
    assert np.allclose(got, want, rtol=0, atol=1e-9 * spec.range * n)


def test_lanes_do_not_carry_at_extreme_values() -> None:
    spec = QuantSpec(bits=10, max_clients=16, range=1.0)
    m = 2048 * spec.lanes
    top = np.full(m, spec.levels)
    zero = np.zeros(m, dtype=np.int64)
    # All clients at the top level: every lane holds its maximum, nothing spills over.
    got = unpack_sum(_encrypt_sum([top] * 16, spec), spec, 16, m)
    assert np.allclose(got, 16 * spec.range)
    alternating = np.where(np.arange(m) % 2 == 0, spec.levels, 0)
    got = unpack_sum(_encrypt_sum([alternating] * 16 + [], spec), spec, 16, m)
    assert np.allclose(got[::2], 16 * spec.range) and np.allclose(got[1::2], -16 * spec.range)
    got = unpack_sum(_encrypt_sum([zero], spec), spec, 1, m)
    assert np.allclose(got, -spec.range)


def test_unpack_refuses_non_integers_and_out_of_range_lanes() -> None:
    spec = QuantSpec(bits=10, max_clients=4, range=1.0)
    ok = pack(np.full(spec.lanes * 4, 5), spec)
    with pytest.raises(CodecError, match="integer"):
        unpack_sum(ok + 0.5, spec, 1, spec.lanes * 4)
    with pytest.raises(CodecError):
        unpack_sum(ok * 0 - 1, spec, 1, spec.lanes * 4)
    lane_over = np.full(4, float(spec.levels + 1))  # lane 0 above one client's maximum
    with pytest.raises(CodecError, match=r"carry|range"):
        unpack_sum(lane_over, spec, 1, spec.lanes * 4)
    with pytest.raises(CodecError):
        unpack_sum(ok, spec, 5, spec.lanes * 4)  # more clients than the headroom


def test_quant_spec_validation_and_wire_form() -> None:
    spec = QuantSpec.for_dp(DP)
    assert QuantSpec.from_wire(spec.to_wire()) == spec
    for bad in ([10, 16], [10, 16, 1], [10, 0, 1.0], [1, 16, 1.0], [10, 16, float("nan")]):
        with pytest.raises(EnvelopeError):
            QuantSpec.from_wire(bad)
    with pytest.raises(CodecError):
        QuantSpec(bits=25, max_clients=8, range=1.0)
    widest = QuantSpec(bits=24, max_clients=1024, range=1.0)
    assert widest.lanes == 1 and widest.scale_bits + widest.lane_bits <= 58
    with pytest.raises(CodecError):
        QuantSpec.for_dp(DPConfig(clip_norm=1.0, noise_multiplier=0.0, min_clients=3))


def _protect(key: object, client: str, vec: np.ndarray, seed: int, **kw: object) -> ProtectedUpdate:
    _, public = contexts(PACKED)
    args: dict[str, object] = {
        "ctx": public,
        "preset": get_preset(PACKED),
        "layout": layout_for(vec.shape[0]),
        "run": RUN,
        "round": 0,
        "client": client,
        "signing_key": key,
        "weighting": "client",
        "dp": DP,
        "rng": np.random.default_rng(seed),
    }
    args.update(kw)
    return protect_vector(vec, **args)  # type: ignore[arg-type]


def _acc(keys: dict[str, object], numel: int, **kw: object) -> Accumulator:
    _, public = contexts(PACKED)
    return Accumulator(
        ctx=public,
        preset=get_preset(PACKED),
        run=RUN,
        round=0,
        layout_digest=layout_for(numel).digest,
        numel=numel,
        key_for=lambda n: keys[n].public_key(),  # type: ignore[attr-defined]
        weighting="client",
        **kw,  # type: ignore[arg-type]
    )


def test_end_to_end_error_is_within_one_percent_of_the_dp_noise(
    client_keys: object, tmp_path: Path
) -> None:
    keys = client_keys(4)  # type: ignore[operator]
    numel = 30_000
    rng = np.random.default_rng(0)
    xs = [rng.normal(scale=0.01, size=numel) for _ in keys]
    acc = _acc(keys, numel)
    for i, (name, key) in enumerate(keys.items()):
        up = _protect(key, name, xs[i], seed=i)
        assert len(up.encode()) / numel < 16
        acc.add(up.encode())
    secret, _ = contexts(PACKED)
    holder = KeyHolder(
        ctx=secret,
        preset=get_preset(PACKED),
        policy=KeyHolderPolicy(run=RUN, min_clients=3),
        client_keys={n: k.public_key() for n, k in keys.items()},
        state_dir=tmp_path,
    )
    out = holder.decrypt(acc.result().encode())
    ys = [privatize(x, DP, rng=np.random.default_rng(i)) for i, x in enumerate(xs)]
    exact = sum(ys) / len(ys)
    noise_std = DP.client_noise_std * math.sqrt(len(ys)) / len(ys)
    rms = float(np.sqrt(np.mean((out.vector - exact) ** 2)))
    spec = QuantSpec.for_dp(DP)
    assert rms <= spec.error_std_bound(len(ys)) / len(ys) * 1.1
    assert rms / noise_std <= 0.01
    holder.close()


def test_packed_refusals(client_keys: object, tmp_path: Path) -> None:
    keys = client_keys(3)  # type: ignore[operator]
    names = list(keys)
    numel = 5000
    vec = np.zeros(numel)
    with pytest.raises(AggregationError, match="aggregator-side"):
        _acc(keys, numel, weighting="aggregator") if False else Accumulator(
            ctx=contexts(PACKED)[1],
            preset=get_preset(PACKED),
            run=RUN,
            round=0,
            layout_digest=layout_for(numel).digest,
            numel=numel,
            key_for=lambda n: keys[n].public_key(),
            weighting="aggregator",
        )
    with pytest.raises(CodecError, match="client weighting"):
        _protect(keys[names[0]], names[0], vec, 0, weighting="aggregator")
    with pytest.raises(CodecError, match="range"):
        spec = QuantSpec(bits=10, max_clients=4, range=0.5)
        _protect(keys[names[0]], names[0], np.full(numel, 0.9), 0, dp=None, quant=spec)
    # Different quantisations cannot be summed.
    acc = _acc(keys, numel)
    acc.add(_protect(keys[names[0]], names[0], vec, 0))
    other = QuantSpec.for_dp(DP, max_clients=4)
    with pytest.raises(AggregationError, match="quantisation"):
        acc.add(_protect(keys[names[1]], names[1], vec, 1, quant=other))
    # The headroom bounds the cohort.
    small = QuantSpec.for_dp(DP, max_clients=2)
    acc = _acc(keys, numel, quant=small)
    for i in range(2):
        acc.add(_protect(keys[names[i]], names[i], vec, i, quant=small))
    with pytest.raises(AggregationError, match="max_clients"):
        acc.add(_protect(keys[names[2]], names[2], vec, 2, quant=small))
    # The key holder refuses a manifest above the headroom too.
    secret, _ = contexts(PACKED)
    holder = KeyHolder(
        ctx=secret,
        preset=get_preset(PACKED),
        policy=KeyHolderPolicy(run=RUN, min_clients=2),
        client_keys={n: k.public_key() for n, k in keys.items()},
        state_dir=tmp_path,
    )
    agg = acc.result()
    ups = [_protect(keys[n], n, vec, 9, quant=small) for n in names]
    from dataclasses import replace

    with pytest.raises(DecryptionRefused, match="too_many_clients"):
        holder.check(replace(agg, manifest=tuple(u.signed for u in ups)))
    holder.close()


def test_v5_statements_round_trip_and_older_ones_are_refused() -> None:
    spec = QuantSpec.for_dp(DP)
    st = UpdateStatement(
        run="r",
        round=2,
        client="c",
        layout_digest=b"\0" * 32,
        preset="xfl-sum",
        numel=1,
        weight=1.0,
        weighting="client",
        ciphertext_digest=b"\1" * 32,
        loss=None,
        quant=spec,
        plan_digest=b"\2" * 32,
        base_round=1,
        base_model_digest=b"\3" * 32,
        dp=DP.spec(),
    )
    assert len(st.to_wire()) == 17
    assert UpdateStatement.from_wire(st.to_wire()) == st
    from dataclasses import replace

    from secure_xfl.crypto.recordspec import RecordDPSpec

    rec = replace(st, record=RecordDPSpec(1.0, 0.9, 0.0137, 20, 1e-5))
    assert UpdateStatement.from_wire(rec.to_wire()) == rec
    assert rec.signing_bytes() != st.signing_bytes()
    assert replace(st, dp=None).signing_bytes() != st.signing_bytes()
    # the old 10-, 11-, 15- and 16-field forms named no plan, DP spec, record-level DP or
    # mask cohort
    olds = (st.to_wire()[:10], st.to_wire()[:11], st.to_wire()[:15], st.to_wire()[:16])
    for old in (*olds, [*st.to_wire(), None]):
        with pytest.raises(EnvelopeError, match="v5"):
            UpdateStatement.from_wire(old)
    with pytest.raises(EnvelopeError, match="base_round"):
        UpdateStatement.from_wire([*st.to_wire()[:12], 3, *st.to_wire()[13:]])
