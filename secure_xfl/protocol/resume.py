"""Resume for the coordinator: its snapshot, restore and the re-sent pending aggregate.

A base class of :class:`~secure_xfl.protocol.coordinator.Coordinator` (no I/O; the
file format and the ε accounting of a re-opened round are in :mod:`.checkpoint`).
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from secure_xfl.crypto.codec import TensorLayout
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.envelope import EncryptedAggregate, SignedStatement
from secure_xfl.crypto.errors import EnvelopeError
from secure_xfl.errors import ConfigError
from secure_xfl.protocol.checkpoint import CheckpointError, CoordinatorState, settings_digest
from secure_xfl.protocol.events import DecryptRequest, RoundRecord
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.protocol.proposal import CoordinatorSettings
from secure_xfl.protocol.rules import AggregationRule

log = logging.getLogger("secure_xfl.protocol.coordinator")

__all__ = ["Resumable"]


class Resumable:
    """Snapshot and restore of the coordinator's state (see the module doc)."""

    settings: CoordinatorSettings
    preset: CKKSPreset
    rule: AggregationRule
    layout: TensorLayout
    params: np.ndarray
    round: int
    attempt: int
    phase: str
    outcome: str
    ok: bool
    budget_exhausted: bool
    loss_ref: float | None
    throughputs: dict[str, float]
    history: list[RoundRecord]
    refused_cohorts: list[str]
    plan: RoundPlan
    record: RoundRecord
    announced_at: float | None
    _plans: dict[int, RoundPlan]
    _reoffer: tuple[int, int] | None

    def _finish(self, outcome: str, now: float, *, ok: bool) -> None:
        raise NotImplementedError

    def _close(self, manifest: tuple[SignedStatement, ...], now: float) -> None:
        raise NotImplementedError

    @property
    def settings_digest(self) -> str:
        """What a checkpoint must have been written under (settings, preset, rule, layout)."""
        return settings_digest(self.settings, preset=self.preset.name, rule=self.rule.name,
                               rule_lr=self.rule.lr, layout=self.layout.digest)  # fmt: skip

    def snapshot(self) -> CoordinatorState:
        """The state to resume from (the open round re-opens empty; see the module doc)."""
        return CoordinatorState(
            run=self.settings.run, settings_digest=self.settings_digest, round=self.round,
            attempt=self.attempt, phase="finished" if self.phase == "finished" else "collecting",
            params=self.params.copy(), rule_state=self.rule.state(), loss_ref=self.loss_ref,
            throughputs=dict(self.throughputs), history=tuple(copy.deepcopy(self.history)),
            refused_cohorts=tuple(self.refused_cohorts), plans=dict(self._plans),
            outcome=self.outcome, ok=self.ok, budget_exhausted=self.budget_exhausted,
        )  # fmt: skip

    def _load(self, st: CoordinatorState) -> None:
        if st.run != self.settings.run or st.settings_digest != self.settings_digest:
            raise CheckpointError("settings_changed", "state of another run or settings")
        if st.params.shape != self.params.shape:
            raise CheckpointError("mismatch", f"params must hold {self.layout.numel} values")
        try:
            self.rule.load_state(st.rule_state)
        except ConfigError as exc:
            raise CheckpointError("mismatch", str(exc)) from None
        self.params = st.params.astype(np.float64, copy=True)
        self.round, self.attempt, self.loss_ref = st.round, st.attempt, st.loss_ref
        self.throughputs = dict(st.throughputs)
        self.history = list(copy.deepcopy(st.history))
        self.refused_cohorts = list(st.refused_cohorts)
        self._plans = dict(st.plans)

    def _resumed(self, st: CoordinatorState) -> None:
        if st.phase == "finished":
            self._finish(st.outcome, self.record.opened_at, ok=st.ok)
            self.budget_exhausted = st.budget_exhausted
            return
        self._reoffer = (self.round, self.attempt)
        old = st.plans.get(self.round)
        if old is not None and old.digest != self.plan.digest:
            # Only the enrolment can change it (packed presets size lanes by it).
            log.warning("round %d re-opened with another plan than before the restart "
                        "(enrolment changed?): clients retrain", self.round)  # fmt: skip
        log.info("resumed run %s at round %d (attempt %d): re-offering it to every client",
                 self.settings.run, self.round, self.attempt)  # fmt: skip

    def resume_decrypting(self, attempt: int, aggregate: bytes, now: float) -> DecryptRequest:
        """After a restart: the open round's aggregate was already sent (its exact bytes
        were kept); close the round on it again, to re-send those bytes."""
        try:
            agg = EncryptedAggregate.decode(aggregate)
        except EnvelopeError as exc:
            raise CheckpointError("corrupt", f"pending aggregate: {exc}") from None
        where = (agg.run, agg.round, attempt)
        if self.phase != "collecting" or where != (self.settings.run, self.round, self.attempt):
            raise CheckpointError("mismatch", f"pending aggregate of (run, round, attempt) "
                                  f"{where} while round {self.round} is {self.phase}")  # fmt: skip
        self._close(agg.manifest, now)
        return DecryptRequest(self.round, aggregate)

    def reopen_clock(self, now: float) -> None:
        """The adapter held the open round back (its checkpoint was not durable yet):
        its give-up delay counts from ``now`` unless it was handed out already."""
        if self.phase == "collecting" and self.announced_at is None:
            self.record.opened_at = now
