"""The DP a client signs it applied, and the noise it implies for a released sum.

A :class:`DPSpec` is a plain, signed value: it travels in the round plan (what
the aggregator *proposes*), in every update statement (what the client
*applied*), in the key holder's policy (what it *requires*) and in the ledger
(what was *released*). Comparing two of them is the one policy check every
party runs against its own kit: :meth:`DPSpec.weaker_than`.

This module sits in the crypto layer because the signed statement carries it;
it does no noising itself (that is :mod:`secure_xfl.privacy.dp`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from secure_xfl.crypto.errors import EnvelopeError

__all__ = ["DEFAULT_DELTA", "MECHANISMS", "DPSpec", "effective_noise"]

#: δ of the (ε, δ) guarantee when a kit does not name one; written once here.
DEFAULT_DELTA = 1e-5
#: Known mechanisms. ``client-gaussian``: clip the whole update to C, add
#: N(0, σ²C²/K) per coordinate on the client (distributed DP over ≥ K clients).
MECHANISMS = ("client-gaussian",)
Mechanism = Literal["client-gaussian"]

_MAX_K = 1_000_000


def signed_number(value: object, name: str) -> float:
    """A finite int or float of a signed spec as float, else :class:`EnvelopeError`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EnvelopeError(f"{name} must be a number")
    out = float(value)
    if not math.isfinite(out):
        raise EnvelopeError(f"{name} must be finite")
    return out


def _number(value: object, name: str) -> float:
    return signed_number(value, f"dp.{name}")


@dataclass(frozen=True)
class DPSpec:
    """Client-level differential privacy of one update, as signed."""

    clip_norm: float
    """L2 bound C on the client's whole (weighted) update; > 0."""
    noise_multiplier: float
    """σ: the client adds N(0, σ²C²/K) per coordinate; 0 means no noise at all."""
    min_clients: int
    """K: the cohort the noise was calibrated for (a sum of ≥ K carries ≥ σC)."""
    delta: float = DEFAULT_DELTA
    """δ of the (ε, δ) guarantee, in (0, 1)."""
    mechanism: Mechanism = "client-gaussian"
    """Which mechanism the numbers describe (see :data:`MECHANISMS`)."""

    def __post_init__(self) -> None:
        clip = _number(self.clip_norm, "clip_norm")
        sigma = _number(self.noise_multiplier, "noise_multiplier")
        delta = _number(self.delta, "delta")
        if clip <= 0:
            raise EnvelopeError("dp.clip_norm must be > 0")
        if sigma < 0:
            raise EnvelopeError("dp.noise_multiplier must be ≥ 0")
        if not 0 < delta < 1:
            raise EnvelopeError("dp.delta must lie in (0, 1)")
        k = self.min_clients
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= _MAX_K:
            raise EnvelopeError(f"dp.min_clients must be an int in [1, {_MAX_K}]")
        if self.mechanism not in MECHANISMS:
            raise EnvelopeError(f"dp.mechanism must be one of {MECHANISMS}")
        object.__setattr__(self, "clip_norm", clip)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "delta", delta)

    @property
    def client_noise_std(self) -> float:
        """Per-coordinate noise std one client adds: σ·C/√K."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)

    def weaker_than(self, policy: DPSpec) -> list[str]:
        """Every axis on which this spec is weaker than ``policy`` (empty: acceptable).

        Stricter is always acceptable: more noise, a smaller clip, a larger cohort.
        δ and the mechanism must match exactly, since ε at another δ is another claim.
        """
        why = []
        if self.mechanism != policy.mechanism:
            why.append(f"mechanism {self.mechanism} != {policy.mechanism}")
        if self.noise_multiplier < policy.noise_multiplier:
            why.append(f"noise_multiplier {self.noise_multiplier:g} < {policy.noise_multiplier:g}")
        if self.clip_norm > policy.clip_norm:
            why.append(f"clip_norm {self.clip_norm:g} > {policy.clip_norm:g}")
        if self.min_clients < policy.min_clients:
            why.append(f"min_clients {self.min_clients} < {policy.min_clients}")
        if self.delta != policy.delta:
            why.append(f"delta {self.delta:g} != {policy.delta:g}")
        return why

    def to_wire(self) -> list[Any]:
        """Positional form, signed inside plans and statements."""
        return [self.mechanism, self.clip_norm, self.noise_multiplier, self.min_clients, self.delta]

    @classmethod
    def from_wire(cls, obj: object) -> DPSpec:
        """Strictly validate the positional form (typed :class:`EnvelopeError`)."""
        if not isinstance(obj, list) or len(obj) != 5:
            raise EnvelopeError("dp must be [mechanism, clip_norm, noise_multiplier, K, delta]")
        mech, clip, sigma, k, delta = obj
        if mech not in MECHANISMS:
            raise EnvelopeError(f"dp.mechanism must be one of {MECHANISMS}")
        return cls(
            clip_norm=_number(clip, "clip_norm"),
            noise_multiplier=_number(sigma, "noise_multiplier"),
            min_clients=k,
            delta=_number(delta, "delta"),
            mechanism=mech,
        )


def effective_noise(specs: Sequence[DPSpec], multipliers: Sequence[float]) -> tuple[float, float]:
    """(σ_eff, sensitivity) of Σ a_i y_i from what each client *signed*.

    Client i clipped to C_i and added noise std σ_i·C_i/√K_i; the aggregator
    multiplied its ciphertext by a_i (1 under client weighting). One client moves
    the sum by at most max_i a_i·C_i, and the sum's noise std is
    sqrt(Σ a_i² σ_i² C_i² / K_i); σ_eff is their ratio. For n equal specs and
    weights this is σ·√(n/K), the figure the accountant has always used.
    """
    if not specs or len(specs) != len(multipliers):
        raise EnvelopeError("need one multiplier per signed DP spec")
    if any(not math.isfinite(a) or a <= 0 for a in multipliers):
        raise EnvelopeError("multipliers must be finite and > 0")
    sens = max(a * s.clip_norm for s, a in zip(specs, multipliers, strict=True))
    # Normalise by the sensitivity first so extreme (legal) weights neither overflow
    # nor underflow the sum of squares.
    var = math.fsum(
        ((a * s.client_noise_std) / sens) ** 2 for s, a in zip(specs, multipliers, strict=True)
    )
    return math.sqrt(var), sens
