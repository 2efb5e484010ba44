"""Accountant: known answers for RDP and PRV, edge cases, monotonicity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from secure_xfl.privacy.accountant import (
    ALPHAS,
    AccountingError,
    PRVUnavailable,
    epsilon,
    epsilon_for,
    rdp_curve,
    rdp_to_epsilon,
)


def _rdp_conversion_by_hand(sigma: float, steps: int, delta: float) -> float:
    """min over α of T·α/(2σ²) − (log δ + log α)/(α − 1) + log((α − 1)/α).

    That is the RDP of T full-batch Gaussian mechanisms converted with the
    Balle et al. 2020 (Thm. 21) bound that Opacus's get_privacy_spent uses.
    """
    a = np.asarray(ALPHAS, dtype=np.float64)
    rdp = steps * a / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(np.min(eps))


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Analytic Gaussian mechanism (Balle & Wang 2018), solved by bisection."""

    def delta_of(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@pytest.mark.parametrize(
    ("sigma", "steps", "delta"),
    [(1.0, 1, 1e-5), (1.0, 10, 1e-5), (4.0, 50, 1e-6), (20.0, 3, 1e-5), (0.7, 100, 1e-3)],
)
def test_rdp_full_participation_known_answer(sigma: float, steps: int, delta: float) -> None:
    expected = _rdp_conversion_by_hand(sigma, steps, delta)
    assert epsilon_for(sigma, 1.0, steps, delta, "rdp") == pytest.approx(expected, rel=1e-12)
    # The RDP curve itself is exactly T·α/(2σ²) at q = 1.
    np.testing.assert_allclose(
        rdp_curve([(sigma, 1.0, steps)]), steps * np.asarray(ALPHAS) / (2 * sigma**2)
    )


def test_rdp_grid_is_close_to_the_continuous_optimum() -> None:
    # The α grid is dense enough that the discrete minimum is within 1 %.
    sigma, steps, delta = 3.0, 20, 1e-5
    fine = np.linspace(1.001, 2000, 2_000_000)
    rdp = steps * fine / (2 * sigma**2)
    best = float(
        np.min(rdp - (np.log(delta) + np.log(fine)) / (fine - 1) + np.log((fine - 1) / fine))
    )
    assert epsilon_for(sigma, 1.0, steps, delta) == pytest.approx(best, rel=0.01)


@pytest.mark.parametrize(
    ("sigma", "steps", "delta"), [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 4, 1e-6), (0.8, 30, 1e-4)]
)
def test_prv_full_participation_matches_analytic_gaussian(
    sigma: float, steps: int, delta: float
) -> None:
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    got = epsilon_for(sigma, 1.0, steps, delta, "prv")
    # PRV returns an upper bound within its eps_error (0.01) of the truth.
    assert exact - 1e-3 <= got <= exact + 0.025
    # And it is tighter than (or equal to) RDP, which is also an upper bound.
    assert got <= epsilon_for(sigma, 1.0, steps, delta, "rdp") + 1e-9


def test_heterogeneous_full_participation_composes_exactly() -> None:
    # Gaussians with σ1, σ2 compose to one with μ² = 1/σ1² + 1/σ2².
    hist = [(1.0, 1.0, 2), (2.0, 1.0, 3)]
    mu = math.sqrt(2 / 1.0 + 3 / 4.0)
    exact = _exact_gaussian_epsilon(mu, 1e-5)
    assert exact - 1e-3 <= epsilon(hist, 1e-5, "prv") <= exact + 0.025


def test_subsampled_prv_is_below_rdp() -> None:
    rdp = epsilon_for(1.0, 0.25, 50, 1e-5, "rdp")
    prv = epsilon_for(1.0, 0.25, 50, 1e-5, "prv")
    assert 0 < prv <= rdp


def test_sigma_zero_is_infinite_and_empty_is_zero() -> None:
    assert epsilon_for(0.0, 1.0, 1, 1e-5) == math.inf
    assert epsilon_for(0.0, 0.5, 3, 1e-5, "prv") == math.inf
    assert epsilon([(1.0, 1.0, 5), (0.0, 1.0, 1)], 1e-5) == math.inf
    assert epsilon([], 1e-5) == 0.0
    assert epsilon_for(1.0, 0.5, 0, 1e-5) == 0.0
    assert epsilon_for(0.0, 0.0, 10, 1e-5) == 0.0
    assert rdp_to_epsilon(rdp_curve([]), 1e-5) == 0.0


@pytest.mark.parametrize("method", ["rdp", "prv"])
def test_monotonicity(method: str) -> None:
    by_rounds = [epsilon_for(2.0, 0.5, t, 1e-5, method) for t in (1, 5, 20)]  # type: ignore[arg-type]
    assert by_rounds == sorted(by_rounds) and by_rounds[0] < by_rounds[-1]
    by_noise = [epsilon_for(s, 0.5, 10, 1e-5, method) for s in (0.8, 1.5, 4.0)]  # type: ignore[arg-type]
    assert by_noise == sorted(by_noise, reverse=True) and by_noise[0] > by_noise[-1]
    by_rate = [epsilon_for(1.5, q, 10, 1e-5, method) for q in (0.1, 0.5, 1.0)]  # type: ignore[arg-type]
    assert by_rate == sorted(by_rate)


def test_merging_identical_steps_changes_nothing() -> None:
    split = epsilon([(1.3, 0.4, 3), (1.3, 0.4, 4)], 1e-5)
    assert split == pytest.approx(epsilon_for(1.3, 0.4, 7, 1e-5))


def test_many_distinct_mechanisms_prv_is_still_an_upper_bound() -> None:
    hist = [(1.5 + 0.01 * i, 0.5 + 0.005 * i, 1) for i in range(9)]
    coarse = epsilon(hist, 1e-5, "prv")
    # Coarsening replaces groups by their least private member: never below
    # the bound for the true history, never above the all-worst history.
    worst = epsilon_for(1.5, 0.54, 9, 1e-5, "prv")
    assert coarse <= worst + 1e-9
    assert coarse >= epsilon_for(1.58, 0.5, 9, 1e-5, "prv") - 0.02


@pytest.mark.parametrize(
    "hist",
    [[(-1.0, 1.0, 1)], [(1.0, 1.5, 1)], [(1.0, -0.1, 1)], [(1.0, 1.0, -1)], [(math.nan, 1.0, 1)],
     [(1.0, 1.0, 1.5)], [(1.0, 1.0)]],
)  # fmt: skip
def test_invalid_history_raises(hist: list[tuple[float, ...]]) -> None:
    with pytest.raises(AccountingError):
        epsilon(hist, 1e-5)  # type: ignore[arg-type]


def test_invalid_delta_and_method() -> None:
    for d in (0.0, 1.0, -1.0, math.nan):
        with pytest.raises(AccountingError):
            epsilon_for(1.0, 1.0, 1, d)
    with pytest.raises(AccountingError):
        epsilon_for(1.0, 1.0, 1, 1e-5, "gdp")  # type: ignore[arg-type]


def test_prv_failure_is_typed() -> None:
    # A huge ε at a tiny δ is out of Opacus's PRV numerical range.
    with pytest.raises(PRVUnavailable):
        epsilon_for(1.0, 1.0, 1000, 1e-15, "prv")
    assert issubclass(PRVUnavailable, AccountingError)
    # RDP still answers.
    assert math.isfinite(epsilon_for(1.0, 1.0, 1000, 1e-15, "rdp"))
