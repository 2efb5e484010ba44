"""What the aggregator proposes: its settings and the round plan built from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from secure_xfl.crypto.codec import layout_of
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.recordspec import RecordDPFloor
from secure_xfl.errors import TrainingError
from secure_xfl.protocol.plan import LocalTraining, RoundPlan, model_digest

__all__ = ["CoordinatorSettings", "propose_plan"]


@dataclass(frozen=True)
class CoordinatorSettings:
    """What the aggregator needs to run rounds (from its own kit: a proposal only)."""

    run: str
    """Run id."""
    rounds: int
    """Rounds to run."""
    min_clients: int
    """Cohort at which a round may close."""
    timeout_s: float
    """A round closes this long after it is first handed out if ≥ min_clients uploaded."""
    dp: DPSpec | None = None
    """Client-level DP to propose (clients and key holder check it against their kits)."""
    record: RecordDPFloor | None = None
    """Record-level DP-SGD to propose (each client runs the stricter of it and its kit)."""
    local: LocalTraining = field(default_factory=LocalTraining)
    """Local-training settings to propose."""
    weighting: Literal["aggregator", "client"] = "aggregator"
    """Who applies weights (see UpdateStatement.weighting)."""
    weight_cap: float = 1e6
    """Public bound on weights; aggregator-side multipliers are weight / weight_cap."""
    max_staleness: int = 4
    """Buffered async: rounds an update may trail the round it is counted in."""
    max_refused: int = 2
    """Times a round is re-opened after the key holder refused its aggregate as invalid
    or out of bounds (each refusal is charged to the budget); then the run stops."""
    max_clients: int = 8
    """Packed presets: lane headroom for this many updates (``xfl-packed``: at least the
    enrolment; ``bfv-lanes``: exactly this, as its context was made for it)."""
    masking: bool = False
    """Propose pairwise masks on packed presets (a masked round fixes its cohort after
    training; see :mod:`secure_xfl.crypto.cohort`)."""
    mask_timeout_s: float = 120.0
    """Masked rounds: seconds the fixed cohort has to upload before the aggregator drops
    the missing members and re-fixes the cohort (fresh keys, a new epoch)."""
    give_up_after_s: float = 0.0
    """Fail the run when a round has fewer than min_clients this long after opening
    (0 = the larger of three times ``timeout_s`` and 300 s, so slow starts survive)."""

    @property
    def give_up_s(self) -> float:
        """The effective give-up delay."""
        return self.give_up_after_s or max(3 * self.timeout_s, 300.0)


def propose_plan(
    s: CoordinatorSettings,
    *,
    round: int,
    model: Mapping[str, np.ndarray],
    preset: CKKSPreset,
    rule: str,
    enrolled: int,
    loss_ref: float | None = None,
    attempt: int = 0,
) -> RoundPlan:
    """The plan an aggregator with settings ``s`` proposes for ``round`` over ``model``."""
    quant = None
    if preset.packed:
        if s.weighting != "client":
            raise TrainingError(f"preset {preset.name!r} needs client-side weighting")
        if s.dp is None or s.dp.noise_multiplier <= 0:
            raise TrainingError(f"preset {preset.name!r} needs client-level DP with σ > 0")
        # BFV's plain modulus was fixed for max_clients; CKKS lanes make room for everyone
        # enrolled now (at least max_clients).
        cap = s.max_clients if preset.scheme == "bfv" else max(s.max_clients, enrolled)
        quant = QuantSpec.for_dp(s.dp, max_clients=cap)
    torch_model = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.items()}
    return RoundPlan(
        run=s.run,
        round=round,
        model_digest=model_digest(model),
        layout_digest=layout_of(torch_model).digest,
        preset=preset.name,
        rule=rule,
        local=s.local,
        dp=s.dp,
        min_clients=s.min_clients,
        weighting=s.weighting,
        weight_cap=s.weight_cap,
        quant=quant,
        deadline_s=s.timeout_s,
        max_staleness=s.max_staleness,
        loss_ref=loss_ref,
        attempt=attempt,
        record=s.record,
        masked=s.masking and quant is not None,
    )
