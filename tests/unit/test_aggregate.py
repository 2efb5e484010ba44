"""decrypt(aggregate(protect(xᵢ))) equals numpy's weighted average within the stated bound."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_xfl.crypto import pki
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.envelope import ProtectedUpdate, SignedStatement
from secure_xfl.crypto.errors import (
    AggregationError,
    LayoutMismatch,
    SignatureInvalid,
    WeightOutOfBounds,
)
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from tests.conftest import contexts
from tests.unit.helpers import RUN, make_accumulator, make_update

KEYS = {f"c{i}": ec.generate_private_key(ec.SECP256R1()) for i in range(20)}


def keyholder(tmp: Path, preset: str = "xfl-default", min_clients: int = 1) -> KeyHolder:
    secret, _ = contexts(preset)
    return KeyHolder(
        ctx=secret,
        preset=get_preset(preset),
        policy=KeyHolderPolicy(run=RUN, min_clients=min_clients),
        client_keys={c: k.public_key() for c, k in KEYS.items()},
        state_dir=tmp,
    )


@given(
    numel=st.integers(1, 5000),
    n_clients=st.integers(1, 20),
    weighting=st.sampled_from(["aggregator", "client"]),
    seed=st.integers(0, 2**32 - 1),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_weighted_average_matches_numpy(
    tmp_path_factory: Any, numel: int, n_clients: int, weighting: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    preset = get_preset("xfl-default")
    names = list(KEYS)[:n_clients]
    xs = {c: rng.normal(scale=rng.uniform(0.01, 10), size=numel) for c in names}
    ws = {c: float(rng.uniform(0.05, 1.0)) for c in names}
    acc = make_accumulator(KEYS, numel, weighting=weighting)  # type: ignore[arg-type]
    for c in names:
        acc.add(make_update(KEYS[c], c, xs[c], weight=ws[c], weighting=weighting).encode(), peer=c)  # type: ignore[arg-type]
    kh = keyholder(tmp_path_factory.mktemp("kh"))
    out = kh.decrypt(acc.result().encode())
    expected = np.average(np.stack([xs[c] for c in names]), axis=0, weights=[ws[c] for c in names])
    max_abs = max(float(np.abs(x).max()) for x in xs.values())
    bound = preset.error_bound(max_abs, n_clients, sum(ws.values()))
    assert np.abs(out.vector - expected).max() <= bound
    assert out.release.participants == tuple(sorted(names))
    kh.close()


@pytest.mark.parametrize("preset", ["nvflare-default", "xfl-sum"])
def test_other_presets_aggregate_correctly(tmp_path: Path, preset: str) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=3000) for _ in range(3)]
    weighting = "client" if get_preset(preset).depth == 0 else "aggregator"
    acc = make_accumulator(KEYS, 3000, preset=preset, weighting=weighting)  # type: ignore[arg-type]
    for i, x in enumerate(xs):
        acc.add(
            make_update(KEYS[f"c{i}"], f"c{i}", x, preset=preset, weight=0.5, weighting=weighting)
        )  # type: ignore[arg-type]
    out = keyholder(tmp_path, preset).decrypt(acc.result())
    bound = get_preset(preset).error_bound(5.0, 3, 1.5)
    assert np.abs(out.vector - np.mean(xs, axis=0)).max() <= bound


def test_fedavg_weights_by_sample_count(tmp_path: Path) -> None:
    counts = {"c0": 100, "c1": 300, "c2": 600}
    xs = {c: np.full(10, float(i + 1)) for i, c in enumerate(counts)}
    acc = make_accumulator(KEYS, 10, weight_scale=1000.0)
    for c, n in counts.items():
        acc.add(make_update(KEYS[c], c, xs[c], weight=n))
    out = keyholder(tmp_path).decrypt(acc.result())
    assert np.allclose(out.vector, (100 * 1 + 300 * 2 + 600 * 3) / 1000, atol=1e-3)
    assert out.total_weight == 1000


def test_second_update_from_same_client_is_refused_and_sum_kept(tmp_path: Path) -> None:
    acc = make_accumulator(KEYS, 10)
    acc.add(make_update(KEYS["c0"], "c0", np.ones(10)))
    with pytest.raises(AggregationError, match="already contributed"):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(10) * 100))
    acc.add(make_update(KEYS["c1"], "c1", np.ones(10) * 3))
    out = keyholder(tmp_path).decrypt(acc.result())
    assert np.allclose(out.vector, 2.0, atol=1e-3)


def test_wrong_run_round_layout_preset_and_peer_are_refused() -> None:
    acc = make_accumulator(KEYS, 10, round=3)
    with pytest.raises(AggregationError, match="round"):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(10), round=2))
    with pytest.raises(AggregationError, match="run"):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(10), round=3, run="other"))
    with pytest.raises(LayoutMismatch):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(11), round=3))
    with pytest.raises(AggregationError, match="preset"):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(10), round=3, preset="nvflare-default"))
    with pytest.raises(AggregationError, match="signed as"):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(10), round=3), peer="c1")
    assert acc.count == 0


def test_update_signed_by_another_key_is_refused() -> None:
    acc = make_accumulator(KEYS, 10)
    with pytest.raises(SignatureInvalid):
        acc.add(make_update(KEYS["c1"], "c0", np.ones(10)))


def test_weight_above_scale_is_refused() -> None:
    acc = make_accumulator(KEYS, 10, weight_scale=10.0)
    with pytest.raises(WeightOutOfBounds, match="exceeds max_weight"):
        acc.add(make_update(KEYS["c0"], "c0", np.ones(10), weight=11))


def resigned(update: ProtectedUpdate, key: Any, **fields: Any) -> ProtectedUpdate:
    """What a malicious client with its genuine key can send: any statement, signed."""
    st = dataclasses.replace(update.statement, **fields)
    return ProtectedUpdate(SignedStatement(st, pki.sign(key, st.signing_bytes())), update.chunks)


@pytest.mark.parametrize("weight", [1e12, 1.0000001, 5.0])
def test_client_weight_above_one_is_refused_before_any_ciphertext(weight: float) -> None:
    acc = make_accumulator(KEYS, 10, weighting="client")
    honest = make_update(KEYS["c1"], "c1", np.ones(10) * 0.1, weighting="client", weight=0.5)
    acc.add(honest)
    bad = resigned(
        make_update(KEYS["c0"], "c0", np.ones(10), weighting="client"), KEYS["c0"], weight=weight
    )
    with pytest.raises(WeightOutOfBounds) as info:
        acc.add(bad)
    assert info.value.code == "weight_out_of_bounds" and acc.count == 1  # nothing lost


def test_depth_zero_preset_refuses_aggregator_weighting() -> None:
    with pytest.raises(AggregationError, match="depth"):
        make_accumulator(KEYS, 10, preset="xfl-sum", weighting="aggregator")


def test_memory_is_one_aggregate_whatever_the_client_count() -> None:
    acc = make_accumulator(KEYS, 5000)
    for i in range(12):
        acc.add(make_update(KEYS[f"c{i}"], f"c{i}", np.ones(5000)))
        assert acc._sum is not None and len(acc._sum) == 3
    assert len(acc.result().chunks) == 3
