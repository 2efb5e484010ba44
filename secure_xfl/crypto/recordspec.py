"""Record-level DP inside one silo, as signed: what DP-SGD a client ran for one round.

Client-level DP (:mod:`secure_xfl.crypto.dpspec`) hides whether a silo took
part; record-level DP bounds what a silo's released updates reveal about any
one of its records. A :class:`RecordDPSpec` travels in every update statement
(the DP-SGD the client *ran* this round: σ_r, the Poisson sampling rate q, the
steps, δ and the privacy unit) and reaches the ledger through the key holder,
so ``secure-xfl audit`` can recompute each silo's ε from the signatures alone.
A :class:`RecordDPFloor` is what a plan proposes or a kit requires; comparing
the two is :meth:`RecordDPSpec.weaker_than`.

The privacy unit is one training block: a sequence of ``block_size`` tokens
of the silo's corpus. User-level units (sampling users instead of blocks) are
not built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from secure_xfl.crypto.dpspec import signed_number
from secure_xfl.crypto.errors import EnvelopeError

__all__ = ["RECORD_MECHANISMS", "RECORD_UNITS", "RecordDPFloor", "RecordDPSpec"]

#: ``dp-sgd-poisson``: each step includes every record independently with
#: probability q, clips each per-record gradient to C_r and adds N(0, σ_r²C_r²).
RECORD_MECHANISMS = ("dp-sgd-poisson",)
#: ``block``: one training sequence of the silo's corpus.
RECORD_UNITS = ("block",)
RecordMechanism = Literal["dp-sgd-poisson"]
RecordUnit = Literal["block"]

_MAX_STEPS = 10_000_000


def _number(value: object, name: str) -> float:
    return signed_number(value, f"record.{name}")


def _delta(value: float) -> float:
    if not 0 < value < 1:
        raise EnvelopeError("record.delta must lie in (0, 1)")
    return value


@dataclass(frozen=True)
class RecordDPFloor:
    """The weakest record-level DP-SGD a plan proposes or a party accepts."""

    max_grad_norm: float
    """Largest per-record clip C_r; > 0."""
    noise_multiplier: float
    """Smallest σ_r (0: no fixed floor; the silo derives σ_r from its ε target)."""
    delta: float
    """δ of the record-level guarantee."""

    def __post_init__(self) -> None:
        clip = _number(self.max_grad_norm, "max_grad_norm")
        sigma = _number(self.noise_multiplier, "noise_multiplier")
        if clip <= 0 or sigma < 0:
            raise EnvelopeError("record.max_grad_norm must be > 0 and noise_multiplier ≥ 0")
        object.__setattr__(self, "max_grad_norm", clip)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "delta", _delta(_number(self.delta, "delta")))

    def tighten(self, other: RecordDPFloor | None) -> RecordDPFloor:
        """The stricter of the two on every axis (δ: this one's, the kit's own)."""
        if other is None:
            return self
        return RecordDPFloor(
            max_grad_norm=min(self.max_grad_norm, other.max_grad_norm),
            noise_multiplier=max(self.noise_multiplier, other.noise_multiplier),
            delta=self.delta,
        )

    def to_wire(self) -> list[Any]:
        """Positional form (inside the signed round plan)."""
        return [self.max_grad_norm, self.noise_multiplier, self.delta]

    @classmethod
    def from_wire(cls, obj: object) -> RecordDPFloor:
        """Strict parse (typed :class:`EnvelopeError`)."""
        if not isinstance(obj, list) or len(obj) != 3:
            raise EnvelopeError("record floor must be [max_grad_norm, noise_multiplier, delta]")
        return cls(*(_number(v, n) for v, n in zip(obj, ("clip", "sigma", "delta"), strict=True)))


@dataclass(frozen=True)
class RecordDPSpec:
    """One round of DP-SGD in one silo, as the client signs it."""

    max_grad_norm: float
    """Per-record clip C_r the client used; > 0."""
    noise_multiplier: float
    """σ_r: Gaussian noise std per step as a multiple of C_r; 0 means none."""
    sample_rate: float
    """q: each step includes each record independently with this probability."""
    steps: int
    """DP-SGD steps this round (each a Poisson-subsampled Gaussian mechanism)."""
    delta: float
    """δ of the record-level guarantee."""
    unit: RecordUnit = "block"
    """Privacy unit (see :data:`RECORD_UNITS`)."""
    mechanism: RecordMechanism = "dp-sgd-poisson"
    """Mechanism (see :data:`RECORD_MECHANISMS`)."""

    def __post_init__(self) -> None:
        clip = _number(self.max_grad_norm, "max_grad_norm")
        sigma = _number(self.noise_multiplier, "noise_multiplier")
        q = _number(self.sample_rate, "sample_rate")
        if clip <= 0 or sigma < 0:
            raise EnvelopeError("record.max_grad_norm must be > 0 and noise_multiplier ≥ 0")
        if not 0 < q <= 1:
            raise EnvelopeError("record.sample_rate must lie in (0, 1]")
        n = self.steps
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_STEPS:
            raise EnvelopeError(f"record.steps must be an int in [0, {_MAX_STEPS}]")
        if self.unit not in RECORD_UNITS:
            raise EnvelopeError(f"record.unit must be one of {RECORD_UNITS}")
        if self.mechanism not in RECORD_MECHANISMS:
            raise EnvelopeError(f"record.mechanism must be one of {RECORD_MECHANISMS}")
        object.__setattr__(self, "max_grad_norm", clip)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "delta", _delta(_number(self.delta, "delta")))

    @property
    def history(self) -> tuple[float, float, int]:
        """The accountant triple (σ_r, q, steps)."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def weaker_than(self, floor: RecordDPFloor) -> list[str]:
        """Every axis on which this spec is weaker than ``floor`` (empty: acceptable)."""
        why = []
        if self.max_grad_norm > floor.max_grad_norm:
            why.append(f"record clip {self.max_grad_norm:g} > {floor.max_grad_norm:g}")
        if self.noise_multiplier < floor.noise_multiplier:
            why.append(f"record σ {self.noise_multiplier:g} < {floor.noise_multiplier:g}")
        if self.delta != floor.delta:
            why.append(f"record δ {self.delta:g} != {floor.delta:g}")
        return why

    def to_wire(self) -> list[Any]:
        """Positional form, signed inside the update statement."""
        return [
            self.mechanism,
            self.unit,
            self.max_grad_norm,
            self.noise_multiplier,
            self.sample_rate,
            self.steps,
            self.delta,
        ]

    @classmethod
    def from_wire(cls, obj: object) -> RecordDPSpec:
        """Strict parse (typed :class:`EnvelopeError`)."""
        if not isinstance(obj, list) or len(obj) != 7:
            raise EnvelopeError("record must be [mechanism, unit, C, σ, q, steps, δ]")
        mech, unit, clip, sigma, q, steps, delta = obj
        if mech not in RECORD_MECHANISMS:
            raise EnvelopeError(f"record.mechanism must be one of {RECORD_MECHANISMS}")
        if unit not in RECORD_UNITS:
            raise EnvelopeError(f"record.unit must be one of {RECORD_UNITS}")
        return cls(
            max_grad_norm=_number(clip, "max_grad_norm"),
            noise_multiplier=_number(sigma, "noise_multiplier"),
            sample_rate=_number(q, "sample_rate"),
            steps=steps,
            delta=_number(delta, "delta"),
            unit=unit,
            mechanism=mech,
        )
