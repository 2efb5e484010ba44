"""What a decrypted aggregate may look like, from what its clients signed.

Every client clipped its (weighted) update to L2 norm C_i and added Gaussian noise
of std s_i = σ_i·C_i/√K_i per coordinate. The released sum S = Σ a_i y_i therefore
satisfies, by the triangle inequality and Gaussian norm concentration
(P[‖z‖ ≥ s(√d + t)] ≤ exp(−t²/2) for z ~ N(0, s²I_d)),

    ‖S‖ ≤ Σ a_i w_i C_i + s_tot (√d + t) + slack,  s_tot = sqrt(Σ a_i² s_i²),

except with probability ≤ :data:`FAILURE_PROBABILITY` for an honest cohort; ``slack``
covers the encoding error (CKKS rounding, or the packed quantiser's step per
client). An aggregate over the bound holds an update that was not clipped as its
client signed, and is refused before anything is charged or released.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.packing import QuantSpec

__all__ = ["FAILURE_PROBABILITY", "l2_norm", "release_bound"]

#: Probability that an honest cohort's release exceeds :func:`release_bound`.
FAILURE_PROBABILITY = 1e-9
_TAIL = math.sqrt(2 * math.log(1 / FAILURE_PROBABILITY))


def release_bound(
    specs: Sequence[DPSpec],
    weights: Sequence[float],
    multipliers: Sequence[float],
    *,
    numel: int,
    preset: CKKSPreset,
    quant: QuantSpec | None,
    client_weighted: bool,
) -> float:
    """Upper bound on ‖Σ a_i y_i‖₂ for honest clients (see the module docstring).

    ``weights`` are the signed weights (pre-applied by the client under client
    weighting, so each contribution's norm is ≤ w_i·C_i), ``multipliers`` the
    aggregator-side a_i (1 under client weighting).
    """
    n = len(specs)
    signal = math.fsum(
        a * (w if client_weighted else 1.0) * s.clip_norm
        for s, w, a in zip(specs, weights, multipliers, strict=True)
    )
    s_tot = math.sqrt(
        math.fsum((a * s.client_noise_std) ** 2 for s, a in zip(specs, multipliers, strict=True))
    )
    root_d = math.sqrt(numel)
    noise = s_tot * (root_d + _TAIL)
    if quant is not None:
        per_coord = n * quant.step  # stochastic rounding moves each value by < one step
    else:
        peak = max(s.clip_norm + 8 * s.client_noise_std for s in specs)
        per_coord = preset.error_bound(peak, n, 1.0)
    return signal + noise + 2 * per_coord * root_d


def l2_norm(vec: np.ndarray) -> float:
    """‖vec‖₂ without overflow for large finite values."""
    peak = float(np.max(np.abs(vec))) if vec.size else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    return peak * float(np.linalg.norm(vec / peak))
