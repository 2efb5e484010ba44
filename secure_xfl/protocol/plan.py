"""The typed round plan: what the aggregator *proposes* for one round.

A plan is a proposal, never an instruction. Each client checks it against
its own kit (:meth:`ClientPolicy.check`) and refuses a weaker one; a client
that accepts signs the plan's digest, the model digest and the DP spec it
applied, and the key holder checks those signatures against its own kit. The
aggregator's settings therefore reach nothing that matters for privacy unless
every party's own policy agrees.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np

from secure_xfl.config import KitConfig
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.errors import CodecError, EnvelopeError
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.recordspec import RecordDPFloor
from secure_xfl.protocol.messages import ProtocolError

__all__ = [
    "PLAN_DOMAIN",
    "ClientPolicy",
    "LocalTraining",
    "PlanRefused",
    "RoundPlan",
    "model_digest",
]

PLAN_DOMAIN = "secure-xfl/round-plan/v3"
_PLAN_FIELDS = 18
_MODEL_DOMAIN = b"secure-xfl/model/v1\0"
_WEIGHTINGS = ("aggregator", "client")


class PlanRefused(ProtocolError):
    """A client's own policy refuses the proposed plan; ``reason`` names the rule."""

    code = "plan_refused"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def model_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 over named float tensors (sorted names, dtype, shape, little-endian bytes)."""
    h = hashlib.sha256(_MODEL_DOMAIN)
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        head = msgpack.packb([name, arr.dtype.str, list(arr.shape)], use_bin_type=True)
        h.update(len(head).to_bytes(4, "big") + head)
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.digest()


def _num(value: object, name: str, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"plan.{name} must be a number")
    out = float(value)
    if not (math.isfinite(out) and lo <= out <= hi):
        raise ProtocolError(f"plan.{name} must lie in [{lo}, {hi}]")
    return out


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"plan.{name} must be an integer in [{lo}, {hi}]")
    return value


def _str(value: object, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128 or not value.isprintable():
        raise ProtocolError(f"plan.{name} must be a short printable string")
    return value


def _digest(value: object, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise ProtocolError(f"plan.{name} must be 32 bytes")
    return value


@dataclass(frozen=True)
class LocalTraining:
    """Local-training settings the aggregator proposes (ML only, no privacy meaning)."""

    local_steps: int = 10
    """Optimisation steps per round on each client."""
    local_lr: float = 1e-3
    """Client learning rate."""
    batch_size: int = 8
    """Client batch size."""
    fedprox_mu: float = 0.0
    """FedProx proximal term μ (0: plain local SGD)."""

    def to_wire(self) -> list[Any]:
        """Positional form."""
        return [self.local_steps, self.local_lr, self.batch_size, self.fedprox_mu]

    @classmethod
    def from_wire(cls, obj: object) -> LocalTraining:
        """Strict parse."""
        if not isinstance(obj, list) or len(obj) != 4:
            raise ProtocolError("plan.local must be [steps, lr, batch_size, fedprox_mu]")
        return cls(
            local_steps=_int(obj[0], "local_steps", 0, 1_000_000),
            local_lr=_num(obj[1], "local_lr", 0.0, 1e3),
            batch_size=_int(obj[2], "batch_size", 1, 1_000_000),
            fedprox_mu=_num(obj[3], "fedprox_mu", 0.0, 1e6),
        )


@dataclass(frozen=True)
class RoundPlan:
    """One round as proposed by the aggregator; its :attr:`digest` is what clients sign."""

    run: str
    """Run id."""
    round: int
    """Round number."""
    model_digest: bytes
    """:func:`model_digest` of the global model (the trainable part) sent with the plan."""
    layout_digest: bytes
    """Tensor layout of the update vector."""
    preset: str
    """CKKS preset name."""
    rule: str
    """Aggregation rule name (see :mod:`secure_xfl.protocol.rules`)."""
    local: LocalTraining
    """Local-training settings."""
    dp: DPSpec | None
    """Client-level DP the aggregator proposes (``None``: none proposed)."""
    min_clients: int
    """Cohort at which the aggregator closes the round."""
    weighting: Literal["aggregator", "client"]
    """Who applies aggregation weights."""
    weight_cap: float
    """Public bound on a weight; client-applied weights are weight / cap ≤ 1."""
    quant: QuantSpec | None
    """Quantisation of packed presets."""
    deadline_s: float
    """Seconds after the round is first handed out at which it closes with ≥ min_clients."""
    max_staleness: int = 4
    """Buffered async: rounds an update may trail the one it is counted in."""
    loss_ref: float | None = None
    """Dynamic weighting: public reference loss (the previous round's smallest)."""
    attempt: int = 0
    """Re-opened round: the key holder refused attempt ``attempt − 1`` after decryption
    (an aggregate out of bounds); every client retrains with fresh noise."""
    record: RecordDPFloor | None = None
    """Record-level DP-SGD the aggregator proposes (``None``: none proposed). Each client
    runs the stricter of this and its own kit; σ_r may be derived per silo."""
    masked: bool = False
    """Packed rounds: uploads carry pairwise masks over a cohort the aggregator fixes
    once the clients trained (:mod:`secure_xfl.crypto.cohort`)."""

    def to_wire(self) -> list[Any]:
        """Positional form; also what :attr:`digest` covers."""
        return [
            self.run,
            self.round,
            self.model_digest,
            self.layout_digest,
            self.preset,
            self.rule,
            self.local.to_wire(),
            None if self.dp is None else self.dp.to_wire(),
            self.min_clients,
            self.weighting,
            self.weight_cap,
            None if self.quant is None else self.quant.to_wire(),
            self.deadline_s,
            self.max_staleness,
            self.loss_ref,
            self.attempt,
            None if self.record is None else self.record.to_wire(),
            self.masked,
        ]

    @property
    def digest(self) -> bytes:
        """SHA-256 of the domain tag and the positional form."""
        body = msgpack.packb([PLAN_DOMAIN, *self.to_wire()], use_bin_type=True)
        return hashlib.sha256(body).digest()

    @classmethod
    def from_wire(cls, obj: object) -> RoundPlan:
        """Strict parse (typed :class:`ProtocolError` on any defect)."""
        if not isinstance(obj, list) or len(obj) != _PLAN_FIELDS:
            raise ProtocolError(f"plan must be a list of {_PLAN_FIELDS} fields")
        weighting = obj[9]
        if weighting not in _WEIGHTINGS:
            raise ProtocolError(f"plan.weighting must be one of {_WEIGHTINGS}")
        try:
            dp = None if obj[7] is None else DPSpec.from_wire(obj[7])
            quant = None if obj[11] is None else QuantSpec.from_wire(obj[11])
            record = None if obj[16] is None else RecordDPFloor.from_wire(obj[16])
        except (EnvelopeError, CodecError) as exc:
            raise ProtocolError(f"plan: {exc}") from None
        if not isinstance(obj[17], bool) or (obj[17] and quant is None):
            raise ProtocolError("plan.masked must be a bool, true only for a packed plan")
        return cls(
            run=_str(obj[0], "run"),
            round=_int(obj[1], "round", 0, 2**31),
            model_digest=_digest(obj[2], "model_digest"),
            layout_digest=_digest(obj[3], "layout_digest"),
            preset=_str(obj[4], "preset"),
            rule=_str(obj[5], "rule"),
            local=LocalTraining.from_wire(obj[6]),
            dp=dp,
            min_clients=_int(obj[8], "min_clients", 1, 1_000_000),
            weighting=weighting,
            weight_cap=_num(obj[10], "weight_cap", 1e-12, 1e15),
            quant=quant,
            deadline_s=_num(obj[12], "deadline_s", 0.0, 1e7),
            max_staleness=_int(obj[13], "max_staleness", 0, 1000),
            loss_ref=None if obj[14] is None else _num(obj[14], "loss_ref", 0.0),
            attempt=_int(obj[15], "attempt", 0, 1000),
            record=record,
            masked=obj[17],
        )


@dataclass(frozen=True)
class ClientPolicy:
    """What a client's own kit demands of any plan it trains on."""

    run: str
    """The only run this client serves."""
    dp: DPSpec | None
    """Weakest DP the client applies (``None``: its kit asks for none)."""
    min_clients: int
    """Smallest cohort the client lets its update be released in."""
    record: RecordDPFloor | None = None
    """Weakest record-level DP-SGD the client runs (``None``: its kit asks for none)."""
    masking: bool = False
    """Refuse packed plans without pairwise masks."""

    @classmethod
    def from_config(cls, cfg: KitConfig) -> ClientPolicy:
        """A client kit's own policy: the weakest plan it will train on."""
        return cls(run=cfg.federation.run, dp=cfg.dp_spec(), min_clients=cfg.federation.min_clients,
                   record=cfg.record_floor(), masking=cfg.privacy.masking)  # fmt: skip

    def record_for(self, plan: RoundPlan) -> RecordDPFloor | None:
        """Record-level DP-SGD to run under ``plan``: the stricter of plan and kit on
        every axis. Record-level noise needs no agreement between silos, so a weaker
        plan is tightened to the kit rather than refused; it can never weaken it."""
        if self.record is None:
            return plan.record
        return self.record.tighten(plan.record)

    def check(self, plan: RoundPlan) -> DPSpec | None:
        """The DP spec to apply for ``plan``, or :class:`PlanRefused` if it is weaker.

        A stricter plan (more noise, smaller clip, larger cohort) is applied as
        proposed; the client never applies less than its own kit demands.
        """
        if plan.run != self.run:
            raise PlanRefused("wrong_run", f"plan is for run {plan.run!r}, kit for {self.run!r}")
        if plan.min_clients < self.min_clients:
            raise PlanRefused(
                "plan_weaker_than_policy",
                f"min_clients {plan.min_clients} < {self.min_clients} (own kit)",
            )
        if self.masking and plan.quant is not None and not plan.masked:
            raise PlanRefused(
                "plan_weaker_than_policy", "packed plan without pairwise masks (own kit)"
            )
        if self.dp is None:
            return plan.dp
        if plan.dp is None:
            raise PlanRefused(
                "plan_weaker_than_policy",
                f"plan proposes no DP; own kit demands σ ≥ {self.dp.noise_multiplier:g}",
            )
        why = plan.dp.weaker_than(self.dp)
        if why:
            raise PlanRefused("plan_weaker_than_policy", "; ".join(why) + " (own kit)")
        return plan.dp
