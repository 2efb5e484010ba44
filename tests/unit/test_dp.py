"""Client-level DP: clipping, noise, configuration and the effective multiplier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from secure_xfl.errors import PrivacyError
from secure_xfl.privacy.dp import (
    DPConfig,
    InvalidDPConfig,
    InvalidUpdate,
    add_client_noise,
    clip_l2,
    effective_noise_multiplier,
    privatize,
    secure_rng,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    vec=arrays(np.float64, st.integers(1, 64), elements=finite),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
def test_clipped_norm_never_exceeds_bound_and_direction_is_kept(
    vec: np.ndarray, clip: float
) -> None:
    out, norm = clip_l2(vec, clip)
    assert norm == pytest.approx(float(np.linalg.norm(vec)), rel=1e-12, abs=1e-300)
    assert np.linalg.norm(out) <= clip * (1 + 1e-12)
    if norm <= clip:
        np.testing.assert_array_equal(out, vec)
    else:
        np.testing.assert_allclose(out * (norm / clip), vec, rtol=1e-9, atol=1e-12)
    assert out is not vec


def test_clip_handles_overflowing_squares() -> None:
    vec = np.array([1e200, -1e200, 3e199])
    out, norm = clip_l2(vec, 2.0)
    assert math.isfinite(norm) and norm == pytest.approx(math.sqrt(2.09) * 1e200)
    assert np.linalg.norm(out) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused(bad: float) -> None:
    vec = np.ones(10)
    vec[3] = bad
    with pytest.raises(InvalidUpdate) as info:
        clip_l2(vec, 1.0)
    assert isinstance(info.value, PrivacyError)
    with pytest.raises(InvalidUpdate):
        privatize(vec, DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=2))


def test_clip_inplace_and_dtypes() -> None:
    vec = np.full(4, 2.0)
    out, norm = clip_l2(vec, 1.0, inplace=True)
    assert out is vec and norm == 4.0 and np.linalg.norm(vec) == pytest.approx(1.0)
    f32, _ = clip_l2(np.ones(3, dtype=np.float32), 10.0)
    assert f32.dtype == np.float64
    t, tnorm = clip_l2(torch.full((2, 2), 3.0), 1.0)
    assert t.shape == (2, 2) and tnorm == pytest.approx(6.0)
    with pytest.raises(InvalidUpdate):
        clip_l2(np.array([1 + 2j]), 1.0)
    with pytest.raises(InvalidDPConfig):
        clip_l2(np.ones(3), 0.0)


def test_large_vector_is_clipped_without_trouble() -> None:
    vec = np.random.default_rng(1).standard_normal(10_000_000)
    out, norm = clip_l2(vec, 1.0, inplace=True)
    assert out is vec and norm > 3000
    assert np.linalg.norm(out) == pytest.approx(1.0)


def test_noise_std_matches_sigma_c_over_sqrt_k() -> None:
    cfg = DPConfig(clip_norm=2.0, noise_multiplier=1.5, min_clients=4)
    expected = 1.5 * 2.0 / 2.0
    assert cfg.client_noise_std == expected
    noise = add_client_noise(np.zeros(400_000), cfg, np.random.default_rng(7))
    assert noise.dtype == np.float64
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.size)
    # std of a sample std ≈ s/√(2n); 6 of those is far beyond chance.
    assert float(noise.std()) == pytest.approx(expected, abs=6 * expected / math.sqrt(2 * 4e5))


def test_noise_is_chunked_yet_covers_every_coordinate() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=1)
    vec = np.zeros((3 << 20) + 17)
    out = add_client_noise(vec, cfg, secure_rng(), inplace=True)
    assert out is vec
    assert np.count_nonzero(vec) == vec.size


def test_sum_over_k_clients_carries_sigma_c_noise() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=2.0, min_clients=8)
    rng = np.random.default_rng(3)
    total = sum(add_client_noise(np.zeros(100_000), cfg, rng) for _ in range(8))
    assert float(np.std(total)) == pytest.approx(2.0, rel=0.02)


def test_sigma_zero_adds_no_noise() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=0.0, min_clients=3)
    assert not cfg.enabled
    vec = np.array([3.0, 4.0])
    out = privatize(vec, cfg, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out, [0.6, 0.8])
    np.testing.assert_array_equal(vec, [3.0, 4.0])


def test_privatize_weights_before_noise() -> None:
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=0.0, min_clients=1)
    out = privatize(np.array([0.0, 10.0]), cfg, weight=0.25)
    np.testing.assert_allclose(out, [0.0, 0.25])
    for bad in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(InvalidDPConfig):
            privatize(np.ones(2), cfg, weight=bad)
    noisy = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=1)
    a = privatize(np.ones(5), noisy, rng=np.random.default_rng(11))
    b = privatize(np.ones(5), noisy, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0, "min_clients": 1},
        {"clip_norm": -1.0, "noise_multiplier": 1.0, "min_clients": 1},
        {"clip_norm": math.nan, "noise_multiplier": 1.0, "min_clients": 1},
        {"clip_norm": 1.0, "noise_multiplier": -0.1, "min_clients": 1},
        {"clip_norm": 1.0, "noise_multiplier": math.inf, "min_clients": 1},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": 0},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": 2.5},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": True},
        {"clip_norm": True, "noise_multiplier": 1.0, "min_clients": 1},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": 1, "delta": 0.0},
        {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": 1, "delta": 1.0},
        {"clip_norm": "1", "noise_multiplier": 1.0, "min_clients": 1},
    ],
)
def test_invalid_configs_raise_typed_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidDPConfig):
        DPConfig(**kwargs)  # type: ignore[arg-type]


def test_config_is_frozen_and_normalised() -> None:
    # numpy scalars (e.g. read from a config array) are accepted and normalised.
    cfg = DPConfig(
        clip_norm=np.float32(1.5),  # type: ignore[arg-type]
        noise_multiplier=1,
        min_clients=np.int64(3),  # type: ignore[arg-type]
    )
    assert type(cfg.clip_norm) is float and type(cfg.min_clients) is int
    with pytest.raises(AttributeError):
        cfg.clip_norm = 2.0  # type: ignore[misc]


def test_effective_noise_multiplier() -> None:
    assert effective_noise_multiplier(1.0, 4, [1.0] * 4) == pytest.approx(1.0)
    assert effective_noise_multiplier(1.2, 4, [1.0] * 9) == pytest.approx(1.2 * math.sqrt(9 / 4))
    weights = [0.5, 0.3, 0.2]
    expected = 2.0 * math.sqrt(sum(w * w for w in weights)) / (math.sqrt(3) * 0.5)
    assert effective_noise_multiplier(2.0, 3, weights) == pytest.approx(expected)
    # Scaling all weights by a constant changes nothing.
    assert effective_noise_multiplier(2.0, 3, [w * 1e-200 for w in weights]) == pytest.approx(
        expected
    )
    for bad in ([], [0.0, 0.0], [1.0, -1.0], [math.nan]):
        with pytest.raises(InvalidDPConfig):
            effective_noise_multiplier(1.0, 2, bad)
    with pytest.raises(InvalidDPConfig):
        effective_noise_multiplier(1.0, 0, [1.0])


def test_effective_multiplier_matches_simulated_aggregate() -> None:
    # Empirical check of the formula: noise std of Σ a_i y_i over sensitivity C·max a.
    cfg = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=2)
    weights = [1.0, 0.5, 0.5]
    rng = np.random.default_rng(5)
    agg = sum(w * add_client_noise(np.zeros(200_000), cfg, rng) for w in weights)
    measured = float(np.std(agg)) / (cfg.clip_norm * max(weights))
    assert measured == pytest.approx(effective_noise_multiplier(1.0, 2, weights), rel=0.02)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int32", "int64", "uint8", "float64"])
def test_clip_handles_low_precision_and_integer_tensors(dtype: str) -> None:
    import torch

    vec = torch.full((1000,), 3, dtype=getattr(torch, dtype))
    out, norm = clip_l2(vec, 1.0)
    assert out.dtype == np.float64
    assert norm == pytest.approx(3 * np.sqrt(1000), rel=1e-3)
    assert np.linalg.norm(out) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("bad", ["bool", "complex64"])
def test_clip_refuses_non_real_tensors(bad: str) -> None:
    import torch

    with pytest.raises(InvalidUpdate):
        clip_l2(torch.ones(4, dtype=getattr(torch, bad)), 1.0)
