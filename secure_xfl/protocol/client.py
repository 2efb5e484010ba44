"""A client's round logic as a sans-IO state machine.

Inputs: the aggregator's replies (``welcome``, ``round``, ``wait``, ``done``,
``ack``), remote error codes, the end of local training, and ``now``. Outputs:
typed actions the adapter performs (:class:`Call`, :class:`Train`,
:class:`SealAndUpload`, :class:`Decline`, :class:`Done`) and
:meth:`next_deadline`, when :meth:`handle_timer` wants to run. The adapter
owns the network, the trainer and the key; this class owns the decisions:
which plan to accept (:class:`ClientPolicy`), what weight to sign, when a
closed round's update re-targets a newer buffer and when it is dropped.

After the adapter had to reconnect (:meth:`ClientRound.reconnected`) the aggregator
may be a new process: a restarted one re-opens the round that was collecting and
offers it again even to a client that already uploaded it, and one that lost its
state may be behind this client. The machine says ``hello`` again and follows the
aggregator's answer rather than its own memory of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.recordspec import RecordDPFloor, RecordDPSpec
from secure_xfl.protocol import messages
from secure_xfl.protocol.plan import ClientPolicy, PlanRefused, RoundPlan, model_digest
from secure_xfl.protocol.rules import make_rule

log = logging.getLogger("secure_xfl.client")

__all__ = [
    "Call",
    "ClientRound",
    "Decline",
    "Done",
    "PublishKey",
    "SealAndUpload",
    "Train",
    "Trained",
    "staleness_weight",
]

State = Literal[
    "joining", "idle", "training", "keying", "cohort", "uploading", "retargeting", "declining",
    "done",
]  # fmt: skip

#: How often a closed round's straggler asks for a newer round, and for how long.
RETARGET_POLL_S = 0.2
RETARGET_PATIENCE_S = 30.0


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedBuff-style polynomial discount (1 + τ)^-a for an update τ rounds old."""
    return float((1 + max(staleness, 0)) ** -exponent)


@dataclass(frozen=True)
class Call:
    """Action: send ``method`` with ``fields`` to the aggregator; feed the reply back."""

    method: Literal["hello", "task", "decline", "cohort"]
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Train:
    """Action: train locally on ``model`` under ``plan``; report with :meth:`trained`."""

    plan: RoundPlan
    dp: DPSpec | None
    """The DP to apply: the plan's, already checked against the client's own kit."""
    model: dict[str, Any]
    hints: Mapping[str, Any]
    record: RecordDPFloor | None = None
    """Record-level DP-SGD floor: the stricter of plan and kit (``None``: off). The
    adapter's silo account turns it into the σ_r to run, or declines the round."""


@dataclass(frozen=True)
class Trained:
    """What the adapter reports after :class:`Train` (the update itself stays with it)."""

    num_samples: int
    loss: float | None
    throughput: float | None
    record: RecordDPSpec | None = None
    """The record-level DP-SGD the update was trained under (signed with it)."""


@dataclass(frozen=True)
class SealAndUpload:
    """Action: privatise with ``dp``, encrypt, sign for ``round`` and upload."""

    round: int
    base_round: int
    weight: float
    dp: DPSpec | None
    plan: RoundPlan
    throughput: float | None
    loss: float | None
    record: RecordDPSpec | None = None
    """Record-level DP-SGD to sign (what training ran)."""
    epoch: int | None = None
    """Masked rounds: the epoch of the cohort in ``members`` (``None``: unmasked)."""
    members: Any = None
    """Masked rounds: the relayed cohort, unverified (the adapter checks it against its
    own CA and policy with :func:`~secure_xfl.crypto.cohort.verify_cohort`)."""


@dataclass(frozen=True)
class PublishKey:
    """Action: make a fresh mask key pair for (round, epoch), publish its signed public
    half with ``mask_key`` and feed the ``ack`` back; keep the private half to mask."""

    round: int
    epoch: int
    plan: RoundPlan


@dataclass(frozen=True)
class Decline:
    """Action: tell the aggregator this client refuses ``round``'s plan, and why."""

    round: int
    reason: str
    detail: str


@dataclass(frozen=True)
class Done:
    """Action: the run is over for this client."""

    ok: bool
    reason: str
    refused: bool = False
    """True when this client ended because its own policy refused the plans."""


Action = Call | Train | PublishKey | SealAndUpload | Decline | Done


class ClientRound:
    """Decides what one client does next; no I/O, no clock of its own."""

    def __init__(self, name: str, policy: ClientPolicy) -> None:
        self.name = name
        self.policy = policy
        self.state: State = "joining"
        self.last = -1  # last round this client finished (uploaded, dropped or declined)
        self.last_attempt = 0  # … and which attempt of it (re-opened rounds retrain)
        self.rounds_done: list[int] = []
        self.refusals: list[str] = []
        self._deadline: float | None = None
        self._pending: tuple[RoundPlan, DPSpec | None, Trained] | None = None
        self._target = -1
        self._retarget_until = 0.0
        self._rejoining = False
        self._epoch: int | None = None  # masked rounds: the epoch being keyed
        # Masked rounds: the trained update kept after its upload, so a re-mask (a member
        # dropped) re-seals it for the new cohort rather than retraining.
        self._kept: tuple[RoundPlan, DPSpec | None, Trained] | None = None

    # -- clock -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to run (``None``: waiting on an input)."""
        return self._deadline

    def handle_timer(self, now: float) -> list[Action]:
        """The deadline passed: ask again."""
        if self._deadline is None or now < self._deadline:
            return []
        self._deadline = None
        if self.state == "retargeting":
            return [Call("hello", {})]
        if self.state == "cohort":
            return [self._ask_cohort()]
        return [self._ask()]

    # -- inputs ------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Begin: say hello."""
        return [Call("hello", {})]

    def on_reply(self, kind: str, msg: Mapping[str, Any], now: float) -> list[Action]:
        """A reply from the aggregator (already decoded and type-checked by the adapter)."""
        if kind == "welcome":
            return self._on_welcome(msg, now)
        if kind == "done":
            ok = msg.get("ok") is True
            self.state = "done"
            refused = bool(self.refusals)
            return [Done(ok=ok and not refused, reason=str(msg.get("reason", "")), refused=refused)]
        if kind == "wait":
            self._deadline = now + float(messages.require(msg, "retry_s", float, lo=0, hi=60))
            return []
        if kind == "round":
            return self._on_round(msg)
        if kind == "ack" and self.state == "keying":
            self.state = "cohort"
            return [self._ask_cohort()]
        if kind == "members" and self.state == "cohort":
            return [self._seal(self._target, members=messages.require(msg, "members", list))]
        if kind == "ack" and self.state == "uploading":
            self.rounds_done.append(self._target)
            return self._finish_round()
        if kind == "ack" and self.state == "declining":
            self.state = "idle"
            return [self._ask()]
        raise messages.ProtocolError(f"unexpected {kind!r} reply in state {self.state}")

    def on_error(self, code: str, message: str, now: float) -> list[Action]:
        """The aggregator refused an upload (or a masked round's key or cohort request)."""
        if self.state in ("keying", "cohort") and code in ("round_closed", "plan_mismatch"):
            # The cohort was fixed without this client, or the epoch moved on: not counted.
            log.warning("round %d: not in the masked cohort: %s: %s", self._target, code, message)
            return self._finish_round()
        if self.state != "uploading" or self._pending is None:
            raise messages.ProtocolError(f"{code}: {message}")
        plan = self._pending[0]
        if code == "round_closed" and make_rule(plan.rule).buffered:
            self.state = "retargeting"
            self._retarget_until = now + RETARGET_PATIENCE_S
            return [Call("hello", {})]
        # plan_mismatch: the round was re-proposed (typically by a restarted aggregator
        # that could not restore it); the update is useless, the run is not.
        if code in ("duplicate_update", "round_closed", "plan_mismatch"):
            log.warning("round %d upload not counted: %s: %s", self._target, code, message)
            return self._finish_round()
        raise messages.ProtocolError(f"upload refused: {code}: {message}")

    def reconnected(self, now: float) -> list[Action]:
        """The adapter had to open a new connection: the aggregator may have restarted.
        Say hello again (before the actions the last reply produced) to learn where the
        run stands now."""
        if self.state in ("joining", "done"):
            return []
        self._rejoining = True
        return [Call("hello", {})]

    def upload_dropped(self, detail: str) -> list[Action]:
        """The adapter cannot upload the pending round's update (e.g. a re-sent upload
        cannot be re-targeted to another round): count it as not delivered."""
        if self.state not in ("uploading", "cohort") or self._pending is None:
            raise messages.ProtocolError("upload_dropped() without a pending upload")
        log.warning("round %d update dropped: %s", self._target, detail)
        return self._finish_round()

    def refuse_training(self, reason: str, detail: str) -> list[Action]:
        """The pending round cannot be trained within this client's own policy (its
        record-level budget): decline it instead."""
        if self.state != "training" or self._pending is None:
            raise messages.ProtocolError("refuse_training() without a Train action")
        plan = self._pending[0]
        self.refusals.append(f"round {plan.round}: {reason}: {detail}")
        log.error("declining round %d of run %s: %s (not training, not uploading)",
                  plan.round, plan.run, detail)  # fmt: skip
        self.state = "declining"
        self.last, self.last_attempt = plan.round, plan.attempt
        self._pending = None
        return [Decline(plan.round, reason, detail)]

    def refuse_cohort(self, reason: str, detail: str) -> list[Action]:
        """The relayed cohort failed this client's own checks (a substituted key, a foreign
        certificate, too few members): decline the round rather than mask for it."""
        if self.state != "uploading" or self._pending is None:
            raise messages.ProtocolError("refuse_cohort() without a pending upload")
        plan = self._pending[0]
        self.refusals.append(f"round {plan.round}: cohort refused: {reason}: {detail}")
        log.error("declining round %d: the aggregator's cohort is refused: %s", plan.round,
                  detail)  # fmt: skip
        self.state, self._pending, self._kept = "declining", None, None
        self.last, self.last_attempt = plan.round, plan.attempt
        return [Decline(plan.round, f"cohort_{reason}", detail)]

    def trained(self, result: Trained) -> list[Action]:
        """Local training of the pending plan finished."""
        if self.state != "training" or self._pending is None:
            raise messages.ProtocolError("trained() without a Train action")
        plan, dp, _ = self._pending
        self._pending = (plan, dp, result)
        self._target = plan.round
        if plan.masked:
            return [self._publish(plan)]
        return [self._seal(plan.round)]

    def _publish(self, plan: RoundPlan) -> PublishKey:
        assert self._epoch is not None
        self.state = "keying"
        return PublishKey(plan.round, self._epoch, plan)

    def _ask_cohort(self) -> Call:
        return Call("cohort", {"round": self._target, "epoch": self._epoch})

    # -- internals ---------------------------------------------------------------------
    def _ask(self) -> Call:
        return Call("task", {"after": self.last, "attempt": self.last_attempt})

    def _on_welcome(self, msg: Mapping[str, Any], now: float) -> list[Action]:
        if self._rejoining:
            self._rejoining = False
            self._rejoin(msg)
        if self.state == "joining":
            self.state = "idle"
            log.info("joined run %s at round %s", msg.get("run"), msg.get("round"))
            return [self._ask()]
        if self.state != "retargeting" or self._pending is None:
            return []
        plan = self._pending[0]
        newer = messages.require(msg, "round", int, lo=0, hi=2**31)
        rounds = messages.require(msg, "rounds", int, lo=0, hi=2**31)
        if newer > self._target and newer < rounds:
            if newer - plan.round > plan.max_staleness:
                log.warning("update from round %d too stale; dropped", plan.round)
                return self._finish_round()
            self._target = newer
            return [self._seal(newer)]
        if newer >= rounds or now >= self._retarget_until:
            log.warning("round %d closed and no newer round is open; update dropped", self._target)
            return self._finish_round()
        self._deadline = now + RETARGET_POLL_S  # the closed round may still be decrypting
        return []

    def _rejoin(self, msg: Mapping[str, Any]) -> None:
        """A ``welcome`` after a reconnect: follow the aggregator's view of the run."""
        run = msg.get("run")
        at = messages.require(msg, "round", int, lo=0, hi=2**31)
        log.info("reconnected: the aggregator's run %s is at round %d (%s)",
                 run, at, msg.get("phase"))  # fmt: skip
        if run != self.policy.run:
            log.warning("the aggregator now runs %r, not %r: its plans will be refused",
                        run, self.policy.run)  # fmt: skip
        if self.state == "idle" and at <= self.last:
            # Not past this client's last round: it may have restarted (a resumed
            # aggregator re-offers its re-opened round anyway; one that lost rounds
            # would otherwise never be asked for a round by this client). A client
            # already counted in that round is simply told to wait.
            (log.warning if at < self.last else log.info)(
                "the aggregator is at round %d, not past this client's round %d: asking "
                "for its current round", at, self.last)  # fmt: skip
            self.last, self.last_attempt = at - 1, 0

    def _on_round(self, msg: Mapping[str, Any]) -> list[Action]:
        plan = RoundPlan.from_wire(messages.require(msg, "plan", list))
        epoch = messages.require(msg, "epoch", int, lo=0, hi=1_000_000, optional=True)
        if plan.masked != (epoch is not None):
            raise messages.ProtocolError("a masked plan comes with its epoch, only it")
        self._epoch = epoch
        kept, self._kept = self._kept, None
        if plan.masked and kept is not None and kept[0].digest == plan.digest:
            # A member dropped after the cohort was fixed: re-mask the same update.
            log.info("round %d: re-masking for epoch %s (not retraining)", plan.round, epoch)
            self._pending, self._target = kept, plan.round
            return [self._publish(plan)]
        model = messages.unpack_tensors(msg.get("model"))
        hints = messages.require(msg, "hints", dict)
        try:
            dp = self.policy.check(plan)
        except PlanRefused as exc:
            self.refusals.append(f"round {plan.round}: {exc}")
            log.error(
                "refusing round %d of run %s: %s (not training, not uploading)",
                plan.round,
                plan.run,
                exc,
            )
            self.state = "declining"
            self.last, self.last_attempt = plan.round, plan.attempt
            return [Decline(plan.round, exc.reason, exc.detail)]
        if model_digest(model) != plan.model_digest:
            raise messages.ProtocolError("the model sent does not match the plan's digest")
        record = self.policy.record_for(plan)
        if (dp is None or dp.noise_multiplier == 0) and record is None:
            log.warning("round %d: training with NO differential privacy (allow_no_dp)",
                        plan.round)  # fmt: skip
        self.state = "training"
        self._pending = (plan, dp, Trained(0, None, None))
        return [Train(plan=plan, dp=dp, model=model, hints=hints, record=record)]

    def _seal(self, round: int, members: Any = None) -> SealAndUpload:
        assert self._pending is not None
        plan, dp, result = self._pending
        rule = make_rule(plan.rule)
        weight = rule.client_weight(result.num_samples, result.loss, plan.weight_cap, plan.loss_ref)
        if plan.weighting == "client" and plan.rule != "dynamic":
            weight = weight / plan.weight_cap
        self.state = "uploading"
        return SealAndUpload(
            round=round,
            base_round=plan.round,
            weight=weight * staleness_weight(round - plan.round),
            dp=dp,
            plan=plan,
            throughput=result.throughput,
            loss=result.loss,
            record=result.record,
            epoch=None if members is None else self._epoch,
            members=members,
        )

    def _finish_round(self) -> list[Action]:
        assert self._pending is not None
        plan = self._pending[0]
        if (plan.round, plan.attempt) > (self.last, self.last_attempt):
            self.last, self.last_attempt = plan.round, plan.attempt
        self._kept = self._pending if plan.masked else None
        self._pending = None
        self.state = "idle"
        return [self._ask()]
