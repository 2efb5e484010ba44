"""PLD accountant and noise calibration: known answers against dp-accounting and theory."""

from __future__ import annotations

import functools
import math

import dp_accounting
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from secure_xfl.privacy.accountant import (
    AccountingError,
    PLDUnavailable,
    calibrate_noise,
    epsilon,
    epsilon_for,
)
from secure_xfl.privacy.pld import VALUE_DISCRETIZATION_INTERVAL

DELTAS = (1e-5, 1e-7)
SIGMAS = (0.6, 1.0, 2.0)
SUBSAMPLED = [(s, q, n) for s in SIGMAS for q in (0.01, 0.05) for n in (1, 50, 500)]
# q = 1 with 500 steps means ε in the hundreds (seconds of FFT, nothing learnt).
FULL = [(s, 1.0, n) for s in SIGMAS for n in (1, 50)]

#: Reference grid: 4× finer than ours (and nested in it: 1e-3 = 4 · 2.5e-4).
REFERENCE_INTERVAL = 2.5e-4


def _event(sigma: float, q: float, steps: int) -> dp_accounting.DpEvent:
    gauss = dp_accounting.GaussianDpEvent(sigma)
    inner = gauss if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
    return dp_accounting.SelfComposedDpEvent(inner, steps)


@functools.cache
def _dp_pld(sigma: float, q: float, steps: int, interval: float) -> PLDAccountant:
    acc = PLDAccountant(value_discretization_interval=interval)
    acc.compose(_event(sigma, q, steps))
    return acc


def _dp_rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    acc = RdpAccountant()
    acc.compose(_event(sigma, q, steps))
    return float(acc.get_epsilon(delta))


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a Gaussian mechanism with sensitivity/σ = μ (Balle & Wang 2018, Thm. 8).

    δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ), the second term in log space.
    """

    def excess(eps: float) -> float:
        tail = math.exp(eps + float(norm.logcdf(-mu / 2 - eps / mu)))
        return float(norm.cdf(mu / 2 - eps / mu)) - tail - delta

    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(brentq(excess, 0.0, hi, xtol=1e-13, rtol=1e-13))


# -- (a) our PLD against dp-accounting itself ---------------------------------


@pytest.mark.parametrize(("sigma", "q", "steps"), SUBSAMPLED)
def test_pld_matches_finer_dp_accounting_pld(sigma: float, q: float, steps: int) -> None:
    # Tolerance. Both answers are pessimistic (upper bounds); ours is on a 4×
    # coarser grid, so it may exceed the reference by its discretisation error,
    # measured ≤ 1.5e-3 (0.28 %, σ = 2, q = 0.01, 500 steps) on this grid: allow
    # 2e-3 + 0.2 % (a 1e-2 grid overshoots by > 0.1 here, so this can fail).
    # It may fall below the reference only by the reference's own pessimism and
    # FFT round-off (measured ≥ -1e-8 on nested grids): allow 1e-6.
    ref = _dp_pld(sigma, q, steps, REFERENCE_INTERVAL)
    for delta in DELTAS:
        fine = float(ref.get_epsilon(delta))
        ours = epsilon_for(sigma, q, steps, delta, "pld")
        assert fine - 1e-6 <= ours <= fine + 2e-3 + 2e-3 * fine, (delta, ours, fine)


@pytest.mark.parametrize("hist", [[(1.0, 0.0137, 100)], [(1.3, 0.02, 40), (0.9, 0.01, 60)]])
def test_pld_is_dp_accounting_pld_accountant(hist: list[tuple[float, float, int]]) -> None:
    # Same events, same order, same grid: the same number as PLDAccountant's.
    acc = PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
    for entry in hist:
        acc.compose(_event(*entry))
    for delta in DELTAS:
        assert epsilon(hist, delta, "pld") == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


# -- (b), (c) RDP against dp-accounting's RDP, PLD below RDP ------------------


@pytest.mark.parametrize(("sigma", "q", "steps"), SUBSAMPLED + FULL)
def test_rdp_agrees_with_dp_accounting_and_pld_is_tighter(
    sigma: float, q: float, steps: int
) -> None:
    for delta in DELTAS:
        ours = epsilon_for(sigma, q, steps, delta, "rdp")
        theirs = _dp_rdp(sigma, q, steps, delta)
        # Same conversion (Balle et al. 2020), different order grids: ours is a
        # superset of dp-accounting's except α = 11 (Opacus's grid skips it:
        # +0.025 % at σ = 2, q = 1, one step), so ours ≤ theirs · 1.001. Ours
        # is lower where dp-accounting drops non-converging fractional orders
        # (−1.7 % at σ = 0.6, q = 0.05, 500 steps): allow 2 % below.
        assert theirs * 0.98 <= ours <= theirs * 1.001, (delta, ours, theirs)
        assert epsilon_for(sigma, q, steps, delta, "pld") <= ours


# -- (d) textbook: the analytic Gaussian mechanism ----------------------------


@pytest.mark.parametrize(("sigma", "steps"), [(s, n) for s, _, n in FULL] + [(3.73, 1), (5.0, 4)])
def test_full_participation_pld_is_the_analytic_gaussian(sigma: float, steps: int) -> None:
    # T Gaussian steps are one Gaussian with μ = √T/σ. The pessimistic PLD must
    # never be below the exact ε (validity); dp-accounting's connect-the-dots
    # Gaussian PLD overshoots it by ≤ 2e-6 here; allow 1e-4 (a tenth of the grid).
    for delta in DELTAS:
        exact = _analytic_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
        ours = epsilon_for(sigma, 1.0, steps, delta, "pld")
        assert exact - 1e-9 <= ours <= exact + 1e-4, (delta, ours, exact)


def test_textbook_gaussian_figures() -> None:
    # Balle & Wang 2018: the analytic Gaussian mechanism needs σ ≈ 3.73 for
    # (ε, δ) = (1, 1e-5); the classical σ = √(2 ln(1.25/δ))/ε (Dwork & Roth,
    # Thm. A.1, ε < 1) is loose, so its σ must give ε strictly below target.
    assert _analytic_gaussian_epsilon(1 / 3.73, 1e-5) == pytest.approx(1.0, abs=1e-3)
    assert epsilon_for(3.73, 1.0, 1, 1e-5, "pld") == pytest.approx(1.0, abs=1e-3)
    classical = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert 0.3 < epsilon_for(classical, 1.0, 1, 1e-5, "pld") < 0.5
    # Composition of heterogeneous Gaussians is exact: μ² = Σ T_i/σ_i².
    exact = _analytic_gaussian_epsilon(math.sqrt(2 / 1.0 + 3 / 4.0), 1e-5)
    assert exact - 1e-9 <= epsilon([(1.0, 1.0, 2), (2.0, 1.0, 3)], 1e-5, "pld") <= exact + 1e-4


# -- edge cases ---------------------------------------------------------------


def test_pld_edge_cases() -> None:
    assert epsilon_for(0.0, 0.5, 3, 1e-5, "pld") == math.inf
    assert epsilon([(1.0, 0.1, 5), (0.0, 1.0, 1)], 1e-5, "pld") == math.inf
    assert epsilon([], 1e-5, "pld") == 0.0
    assert epsilon_for(1.0, 0.0, 10, 1e-5, "pld") == 0.0
    # Merging identical pairs changes nothing.
    split = epsilon([(1.3, 0.04, 30), (1.3, 0.04, 20)], 1e-5, "pld")
    assert split == epsilon_for(1.3, 0.04, 50, 1e-5, "pld")
    # Monotone in steps, σ and q.
    by_steps = [epsilon_for(1.0, 0.05, t, 1e-5, "pld") for t in (1, 10, 100)]
    assert by_steps[0] < by_steps[1] < by_steps[2]
    by_sigma = [epsilon_for(s, 0.05, 10, 1e-5, "pld") for s in (0.8, 1.5, 4.0)]
    assert by_sigma[0] > by_sigma[1] > by_sigma[2]
    with pytest.raises(AccountingError):
        epsilon_for(1.0, 1.5, 1, 1e-5, "pld")
    with pytest.raises(AccountingError):
        epsilon_for(1.0, 0.5, 1, 0.0, "pld")


def test_pld_failure_is_typed() -> None:
    # δ below the pessimistic infinity mass (truncated tails): no finite ε.
    with pytest.raises(PLDUnavailable):
        epsilon_for(1.0, 0.5, 10, 1e-30, "pld")
    assert issubclass(PLDUnavailable, AccountingError)


# -- (e) calibrate_noise ------------------------------------------------------

Q, STEPS, ROUNDS, DELTA = 0.0137, 20, 5, 1e-5


def _eps(sigma: float, history: list[tuple[float, float, int]] | None = None) -> float:
    return epsilon([*(history or []), (sigma, Q, STEPS * ROUNDS)], DELTA, "pld")


def test_calibrate_is_feasible_tight_and_rounded_up() -> None:
    sigma = calibrate_noise(2.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA)
    assert 0.5 < sigma < 1.5
    assert float(f"{sigma:.4g}") == sigma  # four significant digits
    assert _eps(sigma) <= 2.0
    assert _eps(sigma * (1 - 1e-3)) > 2.0
    # A tighter target needs more noise.
    tighter = calibrate_noise(1.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA)
    assert tighter > sigma and _eps(tighter) <= 1.0 < _eps(tighter * (1 - 1e-3))


def test_calibrate_textbook_gaussian() -> None:
    # One full-batch Gaussian step at (1, 1e-5): analytic σ = 3.7306 (Balle &
    # Wang 2018), rounded up to four significant digits.
    assert calibrate_noise(1.0, sample_rate=1.0, steps=1, rounds=1, delta=1e-5) == 3.731


def test_calibrate_with_history_needs_more_noise() -> None:
    history = [(1.1, 0.02, 40), (0.9, 0.0137, 30)]
    fresh = calibrate_noise(2.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA)
    sigma = calibrate_noise(
        2.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA, history=history
    )
    assert sigma > fresh
    assert _eps(sigma, history) <= 2.0 < _eps(sigma * (1 - 1e-3), history)


def test_calibrate_rdp_needs_more_noise_than_pld() -> None:
    pld = calibrate_noise(2.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA)
    rdp = calibrate_noise(2.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA, method="rdp")
    assert rdp > pld
    assert epsilon([(rdp, Q, STEPS * ROUNDS)], DELTA, "rdp") <= 2.0


def test_calibrate_impossible_targets_raise() -> None:
    spent = [(0.5, 1.0, 10)]
    with pytest.raises(AccountingError, match="already spent") as info:
        calibrate_noise(2.0, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA, history=spent)
    assert "target epsilon 2" in str(info.value) and "max_sigma = 50" in str(info.value)
    with pytest.raises(AccountingError, match=r"max_sigma = 0\.5 "):
        calibrate_noise(0.05, sample_rate=Q, steps=STEPS, rounds=ROUNDS, delta=DELTA, max_sigma=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"target_epsilon": 0.0}, {"target_epsilon": -1.0}, {"target_epsilon": math.nan},
     {"target_epsilon": math.inf}, {"rounds": 0}, {"steps": 0}, {"steps": True},
     {"sample_rate": 0.0}, {"sample_rate": 1.5}, {"delta": 0.0}, {"max_sigma": 0.0},
     {"method": "gdp"}, {"history": [(-1.0, 0.1, 1)]}],
)  # fmt: skip
def test_calibrate_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "target_epsilon": 2.0, "sample_rate": Q, "steps": STEPS, "rounds": ROUNDS, "delta": DELTA,
    }  # fmt: skip
    args.update(kwargs)
    with pytest.raises(AccountingError):
        calibrate_noise(**args)  # type: ignore[arg-type]
