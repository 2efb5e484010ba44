"""Client-level differential privacy for whole model updates.

Model (distributed DP): every client clips its flat update to L2 norm ``C``
and adds Gaussian noise of standard deviation ``σ·C/√K`` per coordinate,
where ``K`` is the federation's minimum cohort (``min_clients``). The key
holder only ever decrypts sums over at least ``K`` clients, so each released
sum carries noise of standard deviation at least ``σ·C`` — the noise the
accountant assumes — while no single party had to add all of it.

When the aggregator multiplies client ``i``'s protected vector by a public
weight ``a_i``, the sensitivity of the sum to one client becomes ``C·max a_i``
and its noise ``σ·C/√K·sqrt(Σ a_i²)``; :func:`effective_noise_multiplier`
gives the resulting noise multiplier that must be written to the ledger.

Caveat: the noise is drawn from floating-point Gaussians (numpy), which are
known to leak through their low-order bits in theory (Mironov, CCS 2012).
The secure aggregation hides individual noisy updates, which blunts that
attack, but the guarantee is the textbook one, not a discrete-noise one.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secure_xfl.crypto.dpspec import DEFAULT_DELTA, DPSpec
from secure_xfl.crypto.errors import EnvelopeError
from secure_xfl.errors import PrivacyError

__all__ = [
    "DPConfig",
    "InvalidDPConfig",
    "InvalidUpdate",
    "add_client_noise",
    "clip_l2",
    "effective_noise_multiplier",
    "privatize",
    "secure_rng",
]

FloatArray = npt.NDArray[np.float64]

# Noise is generated in slices of this many coordinates so that noising a
# 10-million-parameter update does not materialise a second full-size buffer.
_NOISE_CHUNK = 1 << 20


class InvalidDPConfig(PrivacyError):
    """A DP parameter is missing, out of range, or not a finite number."""

    code = "privacy.config"


class InvalidUpdate(PrivacyError):
    """An update cannot be privatised: NaN/Inf entries or a non-real dtype."""

    code = "privacy.update"


def _finite_number(name: str, value: object) -> float:
    # bool is an int subclass; True as a clip norm is always a caller bug.
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise InvalidDPConfig(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidDPConfig(f"{name} must be finite, got {out!r}")
    return out


@dataclass(frozen=True)
class DPConfig:
    """Client-level DP settings shared by every client of a run."""

    clip_norm: float
    """L2 bound ``C`` on each client's whole update (> 0)."""

    noise_multiplier: float
    """``σ``: noise std of a minimum-cohort sum divided by ``C`` (≥ 0).

    There is deliberately no default: ``0`` switches DP off and must be
    written out by whoever decides to do so.
    """

    min_clients: int
    """``K``: the smallest cohort the key holder will decrypt (≥ 1)."""

    delta: float = DEFAULT_DELTA
    """Target ``δ`` of the (ε, δ) guarantee (0 < δ < 1)."""

    def __post_init__(self) -> None:
        clip = _finite_number("clip_norm", self.clip_norm)
        sigma = _finite_number("noise_multiplier", self.noise_multiplier)
        delta = _finite_number("delta", self.delta)
        if clip <= 0:
            raise InvalidDPConfig(f"clip_norm must be > 0, got {clip}")
        if sigma < 0:
            raise InvalidDPConfig(f"noise_multiplier must be ≥ 0, got {sigma}")
        if not 0 < delta < 1:
            raise InvalidDPConfig(f"delta must lie in (0, 1), got {delta}")
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int | np.integer):
            raise InvalidDPConfig("min_clients must be an int")
        if self.min_clients < 1:
            raise InvalidDPConfig(f"min_clients must be ≥ 1, got {self.min_clients}")
        # Normalise numpy scalars so the config serialises and compares cleanly.
        object.__setattr__(self, "clip_norm", clip)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "delta", delta)
        object.__setattr__(self, "min_clients", int(self.min_clients))

    @classmethod
    def from_spec(cls, spec: DPSpec) -> DPConfig:
        """The mechanism that applies a signed :class:`DPSpec`."""
        return cls(
            clip_norm=spec.clip_norm,
            noise_multiplier=spec.noise_multiplier,
            min_clients=spec.min_clients,
            delta=spec.delta,
        )

    def spec(self) -> DPSpec:
        """What a client signs after applying this mechanism."""
        try:
            return DPSpec(
                clip_norm=self.clip_norm,
                noise_multiplier=self.noise_multiplier,
                min_clients=self.min_clients,
                delta=self.delta,
            )
        except EnvelopeError as exc:
            raise InvalidDPConfig(str(exc)) from None

    @property
    def enabled(self) -> bool:
        """Whether any noise is added at all."""
        return self.noise_multiplier > 0

    @property
    def client_noise_std(self) -> float:
        """Per-coordinate noise std each client adds: ``σ·C/√K``."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)


def _as_float64(vec: Any, *, inplace: bool) -> FloatArray:
    """Return ``vec`` as a float64 ndarray, copying at most once.

    With ``inplace`` a float64 numpy array is returned as-is (no copy) so the
    caller's buffer is modified; anything else is converted into a fresh array.
    """
    if hasattr(vec, "detach") and type(vec).__module__.startswith("torch"):
        # torch is imported by callers, not here: importing it costs seconds. numpy has
        # no bfloat16, so low-precision floats are widened by torch before crossing.
        t = vec.detach().cpu()
        if t.is_floating_point() and t.element_size() < 4:
            t = t.double()
        elif t.is_complex() or str(t.dtype) == "torch.bool":
            raise InvalidUpdate(f"update must be real-valued, got dtype {t.dtype}")
        vec = t.numpy()
        inplace = False  # never write back into a tensor's storage
    arr = np.asarray(vec)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InvalidUpdate(f"update must be real-valued, got dtype {arr.dtype}")
    if inplace and arr.dtype == np.float64 and arr.flags.c_contiguous and arr.flags.writeable:
        return arr
    return np.array(arr, dtype=np.float64, order="C", copy=True)


def _l2_norm(flat: FloatArray) -> float:
    """L2 norm without temporaries; rejects NaN/Inf and survives overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(flat, flat))
    if math.isfinite(sq):
        return math.sqrt(sq)
    if not bool(np.isfinite(flat).all()):
        raise InvalidUpdate("update contains NaN or infinite values")
    # Finite entries whose squares overflow (|x| > ~1e154): rescale the sum.
    scale = max(float(flat.max()), -float(flat.min()))
    acc = 0.0
    for start in range(0, flat.size, _NOISE_CHUNK):
        part = flat[start : start + _NOISE_CHUNK] / scale
        acc += float(np.dot(part, part))
    return scale * math.sqrt(acc)


def clip_l2(vec: Any, clip_norm: float, *, inplace: bool = False) -> tuple[FloatArray, float]:
    """Scale ``vec`` down to L2 norm at most ``clip_norm``.

    Returns ``(clipped, original_norm)``. ``clipped`` is float64 with the
    input's shape; the norm is taken over all elements. At most one copy of
    the input is made (none when ``inplace`` and the input is a contiguous,
    writeable float64 array, which is then modified).
    """
    clip = _finite_number("clip_norm", clip_norm)
    if clip <= 0:
        raise InvalidDPConfig(f"clip_norm must be > 0, got {clip}")
    out = _as_float64(vec, inplace=inplace)
    norm = _l2_norm(out.reshape(-1))
    if norm > clip:
        out *= clip / norm
    return out, norm


def secure_rng() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG.

    PCG64DXSM is not itself a CSPRNG; the seed is unpredictable and the noise
    samples never leave the client unencrypted, which is what matters here.
    """
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(secrets.randbits(256))))


def add_client_noise(
    vec: Any,
    cfg: DPConfig,
    rng: np.random.Generator | None = None,
    *,
    inplace: bool = False,
) -> FloatArray:
    """Add N(0, (σ·C/√K)²) to every coordinate of ``vec``.

    Returns a new float64 array unless ``inplace`` and ``vec`` is a writeable
    contiguous float64 array, in which case ``vec`` itself is noised and
    returned. With ``σ = 0`` the values are returned unchanged.
    """
    out = _as_float64(vec, inplace=inplace)
    std = cfg.client_noise_std
    if std == 0.0:
        return out
    gen = rng if rng is not None else secure_rng()
    flat = out.reshape(-1)
    for start in range(0, flat.size, _NOISE_CHUNK):
        part = flat[start : start + _NOISE_CHUNK]
        noise = gen.standard_normal(part.size)
        noise *= std
        part += noise
    return out


def privatize(
    vec: Any,
    cfg: DPConfig,
    *,
    weight: float = 1.0,
    rng: np.random.Generator | None = None,
) -> FloatArray:
    """Clip to ``C``, scale by ``weight`` (client-side pre-weighting), add noise.

    ``weight`` must lie in (0, 1]: scaling before the noise keeps the
    contribution's norm within ``C``, so the sensitivity and the accountant's
    assumptions are unchanged while the aggregator can add with weight 1.
    The input is never modified; the result is a new float64 array.
    """
    w = _finite_number("weight", weight)
    if not 0 < w <= 1:
        raise InvalidDPConfig(f"weight must lie in (0, 1], got {w}")
    out, _ = clip_l2(vec, cfg.clip_norm)
    if w != 1.0:
        out *= w
    return add_client_noise(out, cfg, rng, inplace=True)


def effective_noise_multiplier(sigma: float, min_clients: int, weights: Sequence[float]) -> float:
    """Noise multiplier of ``Σ a_i y_i`` relative to its per-client sensitivity.

    Each ``y_i`` carries noise std ``σC/√K`` and one client moves the sum by at
    most ``C·max a_i``, so σ_eff = σ·sqrt(Σ a_i²) / (√K · max a_i); for ``n``
    equal weights this is σ·√(n/K). Weights must be ≥ 0 with at least one
    positive (a zero weight contributes neither signal nor noise).
    """
    s = _finite_number("sigma", sigma)
    if s < 0:
        raise InvalidDPConfig(f"sigma must be ≥ 0, got {s}")
    if (
        isinstance(min_clients, bool)
        or not isinstance(min_clients, int | np.integer)
        or min_clients < 1
    ):
        raise InvalidDPConfig(f"min_clients must be an int ≥ 1, got {min_clients!r}")
    ws = [_finite_number("weight", w) for w in weights]
    if not ws or any(w < 0 for w in ws) or max(ws) == 0:
        raise InvalidDPConfig("weights must be non-negative with at least one positive")
    top = max(ws)
    # Normalising by the largest weight first keeps the sum of squares from
    # overflowing or underflowing for extreme (but legal) weights.
    ratio = math.sqrt(math.fsum((w / top) ** 2 for w in ws))
    return s * ratio / math.sqrt(int(min_clients))
