"""Typed inputs and outputs of the aggregator's state machine, and its refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_xfl.errors import TrainingError
from secure_xfl.protocol.plan import RoundPlan

__all__ = [
    "Accepted",
    "DecryptRequest",
    "Finished",
    "NotEnrolled",
    "Offer",
    "PlanMismatch",
    "RoundClosed",
    "RoundRecord",
    "Wait",
]


class RoundClosed(TrainingError):
    """An upload arrived for a round that is not collecting any more."""

    code = "round_closed"


class NotEnrolled(TrainingError):
    """A peer that is not an enrolled client tried to take part."""

    code = "not_enrolled"


class PlanMismatch(TrainingError):
    """An update signed another plan, base model or DP spec than this round's."""

    code = "plan_mismatch"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Offer:
    """Reply to a task request: work on this plan, starting from this model."""

    plan: RoundPlan
    """The proposed plan."""
    model: dict[str, np.ndarray]
    """Global model (named float32 arrays); its digest is ``plan.model_digest``."""
    hints: dict[str, Any]
    """Unsigned ML hints (enrolled clients, measured throughputs) for partitioning."""
    epoch: int | None = None
    """Masked rounds: the masking epoch the client's key is for (``None``: unmasked)."""


@dataclass(frozen=True)
class Wait:
    """Reply to a task request: nothing to do yet, ask again after ``retry_s``."""

    retry_s: float


@dataclass(frozen=True)
class Finished:
    """Reply to a task request: the run is over."""

    ok: bool
    reason: str
    rounds: int


@dataclass(frozen=True)
class Accepted:
    """Reply to an upload: it is in the running sum."""

    round: int
    count: int


@dataclass(frozen=True)
class DecryptRequest:
    """Action: send this aggregate to the key holder."""

    round: int
    """Round number."""
    aggregate: bytes
    """Encoded :class:`~secure_xfl.crypto.envelope.EncryptedAggregate`."""


@dataclass
class RoundRecord:
    """What happened in one round (for reports)."""

    round: int
    opened_at: float
    closed_at: float = 0.0
    finished_at: float = 0.0
    participants: tuple[str, ...] = ()
    bytes_up: int = 0
    bytes_down: int = 0
    info: dict[str, Any] = field(default_factory=dict)
