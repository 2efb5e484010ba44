"""Privacy accounting for sequences of (sub)sampled Gaussian mechanisms.

Three accountants, selected by ``method``:

* ``"pld"`` (the tightest, and the default of :func:`calibrate_noise`): Google's
  dp-accounting privacy-loss-distribution accountant with its pessimistic
  estimate, so ε is a valid upper bound; see :mod:`secure_xfl.privacy.pld` for
  the event mapping and the discretisation interval chosen.
* ``"rdp"``: Opacus's RDP accountant (Mironov et al.; conversion to (ε, δ) by
  Balle et al. 2020, Thm. 21, as in
  ``opacus.accountants.analysis.rdp.get_privacy_spent``) over a widened order grid.
* ``"prv"``: Opacus's PRV accountant (Gopi et al. 2021).

This module only prepares the history, widens the RDP order grid and turns the
libraries' failure modes into typed errors. Opacus and dp-accounting are
imported lazily, on first use, so importing this module stays cheap.

A history is a sequence of ``(noise_multiplier, sample_rate, steps)``
triples, exactly Opacus's own ``accountant.history`` format.

Two exact simplifications are applied before calling PRV or PLD:

* identical ``(σ, q)`` pairs are merged (composition is commutative; RDP too);
* all full-participation (``q = 1``) Gaussian steps are merged into one
  Gaussian with ``σ' = (Σ steps_i/σ_i²)^(-1/2)``: composing Gaussian
  mechanisms is exactly a Gaussian mechanism with that σ' (the privacy-loss
  distributions are Gaussians whose means and variances add), so no
  precision is lost and the PRV/PLD grids stay small.

PRV fallbacks (documented behaviour, both keep the result a valid upper bound):

* more than ``_PRV_MAX_GROUPS`` distinct ``(σ, q < 1)`` pairs are coarsened by
  replacing each cluster with its smallest σ and largest q, which can only
  increase ε (the subsampled Gaussian is monotone in both);
* when the discretisation grid would exceed ``_PRV_MAX_POINTS`` points (large
  ε or many steps), Opacus's additive ``eps_error`` is raised until it fits;
  the returned upper bound is then looser by that much.

Anything else Opacus refuses (e.g. δ so small that float error dominates)
raises :class:`PRVUnavailable`; dp-accounting failures (or a non-finite PLD
answer) raise :class:`PLDUnavailable`.

:func:`calibrate_noise` inverts any of them: the smallest σ, on a grid of four
significant digits and rounded up, that keeps a history plus the new rounds
within a target ε.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from secure_xfl.errors import PrivacyError

__all__ = [
    "ALPHAS",
    "AccountingError",
    "History",
    "Method",
    "PLDUnavailable",
    "PRVUnavailable",
    "calibrate_noise",
    "epsilon",
    "epsilon_for",
    "rdp_curve",
    "rdp_to_epsilon",
]

History = Sequence[tuple[float, float, int]]
Method = Literal["rdp", "prv", "pld"]

#: RDP orders searched in the conversion. Opacus's default grid stops at 63,
#: which loosens small-ε (large-σ) answers, and starts at 1.1, which loosens
#: very large ε. Integer orders are cheap to evaluate; fractional ones are not.
ALPHAS: tuple[float, ...] = (
    1.01,
    1.02,
    1.05,
    # Opacus's RDPAccountant.DEFAULT_ALPHAS, spelled out so importing this module
    # does not import opacus (seconds of start-up for every service).
    *(1 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    *(64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0),
)

_PRV_EPS_ERROR = 0.01
_PRV_MAX_POINTS = 2_000_000
_PRV_MAX_GROUPS = 6


class AccountingError(PrivacyError):
    """Invalid accountant input (bad σ, q, steps or δ)."""

    code = "privacy.accounting"


class PRVUnavailable(AccountingError):
    """The PRV accountant cannot produce a bound for these parameters."""

    code = "privacy.accounting.prv"


class PLDUnavailable(AccountingError):
    """dp-accounting's PLD accountant cannot produce a bound for these parameters."""

    code = "privacy.accounting.pld"


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0 < d < 1:
        raise AccountingError(f"delta must lie in (0, 1), got {delta!r}")
    return d


def _normalise(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Validate, drop no-op entries and merge identical (σ, q) pairs."""
    merged: dict[tuple[float, float], int] = {}
    for item in history:
        if len(item) != 3:
            raise AccountingError(f"history entries are (sigma, q, steps), got {item!r}")
        sigma, q, steps = float(item[0]), float(item[1]), item[2]
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
            raise AccountingError(f"steps must be an int ≥ 0, got {steps!r}")
        if not math.isfinite(sigma) or sigma < 0:
            raise AccountingError(f"noise multiplier must be finite and ≥ 0, got {sigma!r}")
        if not 0 <= q <= 1:
            raise AccountingError(f"sample rate must lie in [0, 1], got {q!r}")
        if steps == 0 or q == 0:
            continue  # a mechanism that never touches the data costs nothing
        merged[(sigma, q)] = merged.get((sigma, q), 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items()]


def _has_no_noise(history: list[tuple[float, float, int]]) -> bool:
    return any(sigma == 0 for sigma, _, _ in history)


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sigma: float, q: float) -> tuple[float, ...]:
    # Fractional orders make Opacus's series slow (~0.2 s per (σ, q) pair);
    # audits revisit the same pairs for every prefix and client, so cache.
    from opacus.accountants.analysis import rdp as rdp_analysis

    return tuple(
        float(v)
        for v in rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ALPHAS))
    )


def rdp_curve(history: History) -> npt.NDArray[np.float64]:
    """RDP of the composed history at each order of :data:`ALPHAS`.

    Computed with Opacus's ``compute_rdp`` (RDP composes additively).
    """
    total = np.zeros(len(ALPHAS), dtype=np.float64)
    for sigma, q, steps in _normalise(history):
        if sigma == 0:
            return np.full(len(ALPHAS), np.inf)
        total += steps * np.asarray(_rdp_one_step(sigma, q), dtype=np.float64)
    return total


def rdp_to_epsilon(rdp: npt.NDArray[np.float64], delta: float) -> float:
    """Convert an RDP curve to ε at ``delta`` (Opacus's ``get_privacy_spent``)."""
    d = _check_delta(delta)
    if not np.any(rdp):
        return 0.0
    if np.all(np.isinf(rdp)):
        return math.inf
    with warnings.catch_warnings():
        # "optimal order is the smallest/largest alpha": our grid is already
        # wide; the bound stays valid, only possibly loose, so stay quiet.
        warnings.simplefilter("ignore", UserWarning)
        from opacus.accountants.analysis import rdp as rdp_analysis

        eps, _ = rdp_analysis.get_privacy_spent(orders=list(ALPHAS), rdp=rdp, delta=d)
    return max(0.0, float(eps))


def _epsilon_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    # Same arithmetic as RDPAccountant.get_privacy_spent, over the wider grid
    # and with the per-(σ, q) curves cached.
    return rdp_to_epsilon(rdp_curve(history), delta)


def _collapse_full_participation(
    history: list[tuple[float, float, int]],
) -> list[tuple[float, float, int]]:
    full = [(s, n) for s, q, n in history if q == 1.0]
    rest = [(s, q, n) for s, q, n in history if q != 1.0]
    if len(full) > 1 or (full and full[0][1] > 1):
        precision = math.fsum(n / (s * s) for s, n in full)
        full = [(1.0 / math.sqrt(precision), 1)]
    return [(s, 1.0, n) for s, n in full] + rest


def _coarsen(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    full = [h for h in history if h[1] == 1.0]
    rest = sorted(h for h in history if h[1] != 1.0)
    budget = _PRV_MAX_GROUPS - len(full)
    if len(rest) <= budget:
        return history
    groups: list[tuple[float, float, int]] = []
    size = math.ceil(len(rest) / budget)
    for start in range(0, len(rest), size):
        chunk = rest[start : start + size]
        groups.append(
            (min(s for s, _, _ in chunk), max(q for _, q, _ in chunk), sum(n for *_, n in chunk))
        )
    return full + groups


def _epsilon_prv(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    hist = _coarsen(_collapse_full_participation(history))
    delta_error = delta / 1000
    total_steps = sum(n for *_, n in hist)
    # Opacus discretises on [-L, L] with mesh eps_error / sqrt(T·log(12/δ_err)/2),
    # where L is about the RDP ε at δ_err/4 (see compute_safe_domain_size). Widen
    # eps_error just enough to keep the grid within our bound and float
    # round-off below δ (Opacus checks both); the estimate of L only steers this.
    half_width = 3 + max(
        rdp_to_epsilon(rdp_curve(hist), delta_error / 4),
        *(
            rdp_to_epsilon(rdp_curve([(s, q, 1)]), delta_error / (8 * total_steps))
            for s, q, _ in hist
        ),
    )
    root = math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    max_points = min(
        _PRV_MAX_POINTS, 0.5 * (delta - delta_error) / float(np.finfo(np.longdouble).eps)
    )
    eps_error = max(_PRV_EPS_ERROR, 2 * half_width * root / max_points)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            acc = PRVAccountant()
            acc.history = list(hist)
            eps = float(acc.get_epsilon(delta, eps_error=eps_error, delta_error=delta_error))
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as exc:
        raise PRVUnavailable(f"PRV accountant failed: {exc}") from exc
    if not math.isfinite(eps):
        raise PRVUnavailable("PRV accountant returned a non-finite epsilon")
    return max(0.0, eps)


def _epsilon_pld(history: list[tuple[float, float, int]], delta: float) -> float:
    from secure_xfl.privacy.pld import epsilon_pld

    # Subsampled entries first, in history order, and the merged Gaussian last:
    # a history extended by one entry then shares its composed prefix (cached).
    hist = _collapse_full_participation(history)
    return epsilon_pld([h for h in hist if h[1] != 1.0] + [h for h in hist if h[1] == 1.0], delta)


def epsilon(history: History, delta: float, method: Method = "rdp") -> float:
    """ε spent by ``history`` at ``delta``.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` triples.
    Returns ``0.0`` for an empty history and ``inf`` when any mechanism that
    touched the data had ``noise_multiplier == 0``. ``method="prv"`` raises
    :class:`PRVUnavailable` when Opacus's PRV accountant cannot answer;
    ``method="pld"`` raises :class:`PLDUnavailable` when dp-accounting cannot.
    """
    d = _check_delta(delta)
    hist = _normalise(history)
    if not hist:
        return 0.0
    if _has_no_noise(hist):
        return math.inf
    if method == "rdp":
        return _epsilon_rdp(hist, d)
    if method == "prv":
        return _epsilon_prv(hist, d)
    if method == "pld":
        return _epsilon_pld(hist, d)
    raise AccountingError(f"unknown accounting method {method!r}")


def epsilon_for(
    sigma: float, sample_rate: float, rounds: int, delta: float, method: Method = "rdp"
) -> float:
    """ε of ``rounds`` identical (σ, q) rounds; see :func:`epsilon`."""
    return epsilon([(sigma, sample_rate, rounds)], delta, method)


# calibrate_noise searches σ on the grid m·10^e (m = 1000..9999): four
# significant digits, indexed monotonically by 9000·e + (m − 1000).
_SIG_DIGITS = 4
_MIN_SIGMA = 1e-3


def _grid_value(index: int) -> float:
    e, m = divmod(index, 9000)
    return float(f"{m + 1000}e{e - _SIG_DIGITS + 1}")


def _grid_index(x: float, *, up: bool) -> int:
    """Index of the smallest grid value ≥ x (``up``) or the largest ≤ x."""
    e = math.floor(math.log10(x))
    i = 9000 * e + int(x / 10.0 ** (e - _SIG_DIGITS + 1)) - 1000
    while _grid_value(i) > x:
        i -= 1
    while _grid_value(i + 1) <= x:
        i += 1
    return i + 1 if up and _grid_value(i) < x else i


def calibrate_noise(
    target_epsilon: float,
    *,
    sample_rate: float,
    steps: int,
    rounds: int,
    delta: float,
    history: History = (),
    method: Method = "pld",
    max_sigma: float = 50.0,
) -> float:
    """Smallest noise multiplier that keeps ``history`` + the new rounds within budget.

    Returns the smallest σ on a four-significant-digit grid (so the answer is
    rounded *up*, never below the exact threshold) with
    ``epsilon([*history, (σ, sample_rate, steps * rounds)], delta, method) <=
    target_epsilon``, found by bisection; the value returned was itself
    evaluated, and the grid point just below it was evaluated and does not fit
    (σ never goes below ``_MIN_SIGMA``; probes the accountant cannot bound count
    as over budget). Raises :class:`AccountingError` for invalid arguments and when even
    ``max_sigma`` does not fit (e.g. ``history`` already spent the target).
    """
    target = float(target_epsilon)
    if not (math.isfinite(target) and target > 0):
        raise AccountingError(f"target epsilon must be finite and > 0, got {target_epsilon!r}")
    for name, value in (("steps", steps), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise AccountingError(f"{name} must be an int ≥ 1, got {value!r}")
    q = float(sample_rate)
    if not 0 < q <= 1:
        raise AccountingError(f"sample rate must lie in (0, 1], got {sample_rate!r}")
    top = float(max_sigma)
    if not (math.isfinite(top) and top >= _MIN_SIGMA):
        raise AccountingError(f"max_sigma must be finite and ≥ {_MIN_SIGMA}, got {max_sigma!r}")
    if method not in get_args(Method):
        raise AccountingError(f"unknown accounting method {method!r}")
    d = _check_delta(delta)
    past = list(history)
    spent = epsilon(past, d, method)  # validates history
    total = int(steps) * int(rounds)

    def eps_at(index: int) -> float:
        return epsilon([*past, (_grid_value(index), q, total)], d, method)

    hi = _grid_index(top, up=False)
    where = f"target epsilon {target:g} at delta {d:g} ({method})"
    if spent >= target:
        raise AccountingError(
            f"cannot meet {where}: the history already spent {spent:.4g}, so no noise "
            f"multiplier up to max_sigma = {_grid_value(hi):g} fits"
        )
    worst = eps_at(hi)
    if worst > target:
        raise AccountingError(
            f"cannot meet {where}: the history already spent {spent:.4g} and even "
            f"max_sigma = {_grid_value(hi):g} for {rounds} round(s) of {steps} step(s) "
            f"at q = {q:g} reaches {worst:.4g}"
        )

    def fits(index: int) -> bool:
        try:
            return eps_at(index) <= target
        except (PLDUnavailable, PRVUnavailable):
            return False  # no valid bound there: treat as over budget

    floor = _grid_index(_MIN_SIGMA, up=True)
    lo = None  # grid index known not to fit; hi is known to fit
    while lo is None:
        probe = max(floor, _grid_index(_grid_value(hi) / 2, up=True))
        if probe >= hi:
            return _grid_value(hi)  # fits all the way down to _MIN_SIGMA
        if fits(probe):
            hi = probe
        else:
            lo = probe
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return _grid_value(hi)
