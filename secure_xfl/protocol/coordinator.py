"""The aggregator's round logic as a sans-IO state machine.

Inputs are a client's hello / task request / upload / decline, the key
holder's answer or refusal, and ``now``. Outputs are typed values: an
:class:`Offer` (plan + model), :class:`Wait` or :class:`Finished` for a task
request, a :class:`DecryptRequest` action from :meth:`handle_timer`, and
:meth:`next_deadline` for the adapter to sleep on. Nothing here touches a
socket, a thread or the wall clock, so unit tests drive whole runs in memory
and the QUIC service is a thin adapter around it.

The coordinator only *proposes* (:class:`RoundPlan`); it checks that every
update signed this round's plan, base model and DP spec, but the guarantees
come from the clients' and the key holder's own policies.

Resume: :meth:`~Coordinator.snapshot` / :meth:`~Coordinator.restore` (no I/O; the
format and the ε accounting of a re-opened round are in :mod:`.checkpoint`). The
restored round re-opens with the same attempt and plan digest and is offered to every
client not in its accumulator, even one whose ``task`` says it finished it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import tenseal as ts
import torch

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import flatten, layout_of, unflatten
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.envelope import ProtectedUpdate, SignedStatement
from secure_xfl.errors import ConfigError, SecureXFLError, TrainingError
from secure_xfl.protocol.checkpoint import CoordinatorState
from secure_xfl.protocol.events import (
    Accepted,
    DecryptRequest,
    Finished,
    NotEnrolled,
    Offer,
    PlanMismatch,
    RoundClosed,
    RoundRecord,
    Wait,
)
from secure_xfl.protocol.masked import MaskEpoch, certificate_pem
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.protocol.proposal import CoordinatorSettings, propose_plan
from secure_xfl.protocol.resume import Resumable
from secure_xfl.protocol.rules import AggregationRule

log = logging.getLogger(__name__)

Phase = Literal["collecting", "decrypting", "finished"]

__all__ = ["Accepted", "Coordinator", "CoordinatorSettings", "CoordinatorState", "DecryptRequest",
           "Finished", "NotEnrolled", "Offer", "PlanMismatch", "RoundClosed", "RoundRecord",
           "Wait"]  # fmt: skip


#: Key-holder refusals after decryption: the round is re-opened, not burnt.
RETRYABLE = frozenset({"aggregate_invalid", "aggregate_out_of_bounds"})


class Coordinator(Resumable):
    """Runs synchronous (or buffered asynchronous) rounds over encrypted updates."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        ctx: ts.Context,
        preset: CKKSPreset,
        enrolled: Callable[[], Mapping[str, Any]],
        model: Mapping[str, np.ndarray],
        rule: AggregationRule,
        now: float,
        state: CoordinatorState | None = None,
    ) -> None:
        """``state``: resume from a :meth:`snapshot` (see :meth:`restore`)."""
        self.settings = settings
        self.ctx = ctx
        self.preset = preset
        self.enrolled = enrolled  # name -> verification key; re-read so new clients count
        self.rule = rule
        torch_model = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.items()}
        self.layout = layout_of(torch_model)
        self.params = flatten(torch_model, self.layout)
        self.round = 0
        self.phase: Phase = "collecting"
        self.outcome = ""
        self.ok = False
        self.budget_exhausted = False
        self.history: list[RoundRecord] = []
        self.throughputs: dict[str, float] = {}
        self.loss_ref: float | None = None
        self.declined: dict[str, str] = {}  # client -> why it refused this round's plan
        self._plans: dict[int, RoundPlan] = {}  # recent plans, for buffered async
        self.attempt = 0  # re-opened after refused aggregates
        self.refused_cohorts: list[str] = []
        self._losses: list[float] = []  # reported by the cohort of the closed round
        self._reoffer: tuple[int, int] | None = None  # restored (round, attempt)
        self.mask: MaskEpoch | None = None  # masked rounds: this epoch's keys and cohort
        self.epoch, self._epoch_round = 0, -1
        if settings.masking and rule.buffered and preset.packed:
            raise ConfigError("masked rounds are synchronous: buffered rules cannot mask "
                              "(set privacy.masking = false)")  # fmt: skip
        if state is not None:
            self._load(state)
        self._open(now)
        if state is not None:
            self._resumed(state)

    @classmethod
    def restore(
        cls, state: CoordinatorState, settings: CoordinatorSettings, **kw: Any
    ) -> Coordinator:
        """A coordinator continuing from ``state`` (``kw`` as for the constructor; its
        ``model`` gives only the layout)."""
        return cls(settings, state=state, **kw)

    # -- state ---------------------------------------------------------------------------
    def _open(self, now: float) -> None:
        s = self.settings
        self.plan = propose_plan(
            s,
            round=self.round,
            model=self.model(),
            preset=self.preset,
            rule=self.rule.name,
            enrolled=len(self.enrolled()),
            loss_ref=self.loss_ref,
            attempt=self.attempt,
        )
        if (self.plan.dp is None or self.plan.dp.noise_multiplier == 0) and not self.plan.record:
            log.warning("round %d: this aggregator's kit proposes NO differential privacy "
                        "(clients and key holder apply their own kits)", self.round)  # fmt: skip
        self._plans[self.round] = self.plan
        for old in [r for r in self._plans if r < self.round - s.max_staleness]:
            del self._plans[old]
        # Epochs label every cohort fixed in a round (attempts and re-masks alike).
        if self._epoch_round == self.round:
            self.epoch += 1
        else:
            self.epoch, self._epoch_round = 0, self.round
        self.mask = MaskEpoch(s.run, self.round, self.epoch) if self.plan.masked else None
        self.acc = self._accumulator()
        self.record = RoundRecord(round=self.round, opened_at=now)
        self.announced_at: float | None = None
        self.declined = {}
        self.phase = "collecting"
        log.info("round %d open (run %s, plan %s)", self.round, s.run, self.plan.digest.hex()[:12])

    def _accumulator(self) -> Accumulator:
        s = self.settings
        return Accumulator(
            ctx=self.ctx,
            preset=self.preset,
            run=s.run,
            round=self.round,
            layout_digest=self.layout.digest,
            numel=self.layout.numel,
            key_for=lambda name: self.enrolled()[name],
            weighting=s.weighting,
            weight_scale=s.weight_cap if s.weighting == "aggregator" else 1.0,
            quant=self.plan.quant,
        )

    def model(self) -> dict[str, np.ndarray]:
        """Current global parameters as named float32 arrays."""
        return {
            k: v.numpy().astype(np.float32, copy=False)
            for k, v in unflatten(self.params, self.layout).items()
        }

    # -- client-facing inputs ----------------------------------------------------------------
    def _check_peer(self, peer: str) -> None:
        if peer not in self.enrolled():
            raise NotEnrolled(f"{peer!r} is not an enrolled client of run {self.settings.run}")

    def hello(self, peer: str) -> dict[str, Any]:
        """A client connects: tell it where the run stands."""
        self._check_peer(peer)
        return {
            "run": self.settings.run,
            "round": self.round,
            "rounds": self.settings.rounds,
            "preset": self.preset.name,
            "phase": self.phase,
        }

    def task(
        self, peer: str, after: int, now: float | None = None, attempt: int = 1 << 30
    ) -> Offer | Wait | Finished:
        """The round a client should work on next, :class:`Wait` or :class:`Finished`.

        The round's deadline runs from the first time it is handed to a client
        (``now``), not from when it opened: a cohort still starting up is not late.
        """
        self._check_peer(peer)
        if self.phase == "finished":
            return Finished(ok=self.ok, reason=self.outcome, rounds=len(self.history))
        # A restored round is offered even to a client that says it finished it.
        done = (self.round, self.attempt) <= (after, attempt)
        if (
            self.phase != "collecting"
            or (done and self._reoffer != (self.round, self.attempt))
            or peer in self.acc.clients
            or peer in self.declined
            or (self.mask is not None and (peer in self.mask.keys or self.mask.cohort is not None))
        ):
            return Wait(retry_s=0.2)
        if self.announced_at is None:
            self.announced_at = self.record.opened_at if now is None else now
        hints = {"clients": sorted(self.enrolled()), "throughputs": dict(self.throughputs)}
        epoch = None if self.mask is None else self.epoch
        return Offer(plan=self.plan, model=self.model(), hints=hints, epoch=epoch)

    def _masked(self, peer: str, round: int) -> MaskEpoch:
        self._check_peer(peer)
        if self.phase != "collecting" or self.mask is None or round != self.round:
            raise RoundClosed(f"round {round} is not a collecting masked round "
                              f"(current {self.round}, {self.phase})")  # fmt: skip
        return self.mask

    def mask_key(self, peer: str, round: int, epoch: int, key: object) -> None:
        """A client that trained publishes its signed X25519 key for this epoch."""
        self._masked(peer, round).add_key(peer, round, epoch, key, self.enrolled()[peer])

    def members(self, peer: str, round: int, epoch: int) -> list[list[Any]] | None:
        """The fixed cohort's keys and certificates (``None``: not fixed yet)."""
        return self._masked(peer, round).members_for(peer, round, epoch)

    def _check_plan(self, update: ProtectedUpdate) -> None:
        st = self.plan if not self.rule.buffered else self._plans.get(update.statement.base_round)
        signed = update.statement
        if st is None or signed.round - signed.base_round > self.settings.max_staleness:
            raise PlanMismatch("too_stale", f"base round {signed.base_round} is not open")
        if not self.rule.buffered and signed.base_round != signed.round:
            raise PlanMismatch("plan_mismatch", "a synchronous update must train on its round")
        if signed.plan_digest != st.digest:
            raise PlanMismatch("plan_mismatch", f"{signed.client!r} signed another plan")
        if signed.base_model_digest != st.model_digest:
            raise PlanMismatch("plan_mismatch", f"{signed.client!r} trained another model")
        if signed.dp != st.dp:
            raise PlanMismatch("dp_mismatch", f"{signed.client!r} signed DP {signed.dp}")
        if self.mask is not None:
            self.mask.check_upload(signed)

    def upload(
        self, peer: str, round: int, blob: bytes, throughput: float | None = None
    ) -> Accepted:
        """Verify and accumulate one protected update (atomic: all or nothing).

        ``throughput`` (samples/s, reported in plaintext) sizes dynamic partitions.
        """
        self._check_peer(peer)
        if throughput is not None and throughput > 0:
            # Recorded even for a late upload: slow clouds are exactly what
            # dynamic partitioning needs to hear about.
            self.throughputs[peer] = throughput
        if self.phase != "collecting" or round != self.round:
            raise RoundClosed(
                f"round {round} is not collecting (current {self.round}, {self.phase})"
            )
        update = ProtectedUpdate.decode(blob)
        # Identity, run, round, shape, weight and signature first (the most specific
        # refusal), then whether the signed plan, model and DP are this round's.
        self.acc.add(update, peer=peer, also=self._check_plan)
        self.record.bytes_up += len(blob)
        if self.announced_at is None:  # a re-sent upload after a resume, before any task
            self.announced_at = self.record.opened_at
        log.info("round %d: update from %s accepted (%d/%d)",
                 self.round, peer, self.acc.count, len(self.enrolled()))  # fmt: skip
        return Accepted(round=self.round, count=self.acc.count)

    def decline(self, peer: str, round: int, reason: str, detail: str, now: float) -> None:
        """A client's own policy refused this round's plan: record it, maybe end the run.

        Once so many clients refused that ``min_clients`` can no longer be reached,
        the run ends (not OK): no later round would be proposed differently.
        """
        self._check_peer(peer)
        if round != self.round or self.phase != "collecting":
            return
        self.declined[peer] = f"{reason}: {detail}"
        log.error("round %d: %s refused the plan: %s: %s", round, peer, reason, detail)
        able = len(self.enrolled()) - len(self.declined)
        if able < self.settings.min_clients:
            why = "; ".join(f"{c}: {r}" for c, r in sorted(self.declined.items()))
            self._finish(f"clients refused the plan of round {round} ({why})", now, ok=False)

    def note_download(self, nbytes: int) -> None:
        """Account bytes sent to clients (the adapter knows the encoded size)."""
        self.record.bytes_down += nbytes

    # -- clock and key holder ------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has something to do (``None``: on input only)."""
        if self.phase != "collecting":
            return None
        s = self.settings
        give_up = self.record.opened_at + s.give_up_s
        if self.mask is not None and self.mask.fixed_at is not None:
            return min(self.mask.fixed_at + s.mask_timeout_s, give_up)
        if self.announced_at is None:
            return give_up
        return min(self.announced_at + s.timeout_s, give_up)

    def handle_timer(self, now: float) -> DecryptRequest | None:
        """Close the round when complete or past its deadline; maybe fail the run."""
        if self.phase != "collecting":
            return None
        if self.mask is not None:
            return self._masked_timer(self.mask, now)
        s = self.settings
        count, enrolled = self.acc.count, len(self.enrolled()) - len(self.declined)
        elapsed = now - self.record.opened_at
        # Buffered async releases a buffer as soon as it covers min_clients;
        # stragglers re-target the next buffer with a staleness discount.
        wanted = s.min_clients if self.rule.buffered else max(enrolled, s.min_clients)
        complete = count >= wanted
        late = (
            self.announced_at is not None
            and now - self.announced_at >= s.timeout_s
            and count >= s.min_clients
        )
        if complete or late:
            self._close(self.acc.result_manifest(), now)
            log.info("round %d closed with %d clients%s", self.round, count,
                     " at the deadline" if late and not complete else "")  # fmt: skip
            return DecryptRequest(self.round, self.acc.result().encode())
        if elapsed >= s.give_up_s:
            self._finish(f"round {self.round} had {count} < min_clients {s.min_clients} "
                         f"uploads after {elapsed:.0f}s", now, ok=False)  # fmt: skip
        return None

    def _masked_timer(self, m: MaskEpoch, now: float) -> DecryptRequest | None:
        """Fix the cohort, close on it whole, or re-mask without a member that dropped."""
        s = self.settings
        need = max(2, s.min_clients)
        if m.cohort is None:
            keys, able = len(m.keys), len(self.enrolled()) - len(self.declined)
            late = self.announced_at is not None and now - self.announced_at >= s.timeout_s
            if keys >= need and (keys >= able or late):
                m.fix(lambda c: certificate_pem(self.enrolled()[c]), now)
                return None
        elif self.acc.clients >= set(m.cohort):
            self._close(self.acc.result_manifest(), now)
            log.info("round %d closed with its masked cohort of %d", self.round, len(m.cohort))
            return DecryptRequest(self.round, self.acc.result().encode())
        elif m.fixed_at is not None and now - m.fixed_at >= s.mask_timeout_s:
            missing = ", ".join(sorted(set(m.cohort) - self.acc.clients))
            log.warning("round %d epoch %d: %s did not upload within %gs of the cohort being "
                        "fixed: discarding the masked sum, re-masking with fresh keys",
                        self.round, self.epoch, missing, s.mask_timeout_s)  # fmt: skip
            self.epoch += 1
            self.mask, self.acc = MaskEpoch(s.run, self.round, self.epoch), self._accumulator()
            self._reoffer, self.announced_at = (self.round, self.attempt), now
            return None
        if now - self.record.opened_at >= s.give_up_s:
            self._finish(f"masked round {self.round} found no complete cohort of ≥ {need} "
                         f"after {now - self.record.opened_at:.0f}s", now, ok=False)  # fmt: skip
        return None

    def decrypted(
        self, round: int, average: np.ndarray, info: Mapping[str, Any], now: float
    ) -> RoundRecord:
        """The key holder's weighted average arrived: apply the rule, open the next round.

        Returns the finished round's record (the adapter logs and annotates it).
        """
        if self.phase != "decrypting" or round != self.round:
            raise TrainingError(f"unexpected decryption result for round {round}")
        if average.shape != self.params.shape:
            raise TrainingError("decrypted aggregate has the wrong length")
        self.params = self.rule.apply(self.params, average)
        if self._losses:
            self.loss_ref = min(self._losses)
        record = self.record
        record.finished_at = now
        record.info = dict(info)
        self.history.append(record)
        self.round += 1
        if self.round >= self.settings.rounds:
            self._finish("completed", now, ok=True)
        else:
            self._open(now)
        return record

    def _close(self, manifest: tuple[SignedStatement, ...], now: float) -> None:
        self.phase = "decrypting"
        self.record.closed_at = now
        self.record.participants = tuple(sorted({s.statement.client for s in manifest}))
        self._losses = [s.statement.loss for s in manifest if s.statement.loss is not None]

    def annotate(self, round: int, metrics: Mapping[str, Any]) -> None:
        """Attach evaluation metrics to a finished round's record."""
        for rec in self.history:
            if rec.round == round:
                rec.info.update(metrics)

    def decrypt_failed(
        self, round: int, error: SecureXFLError | str, now: float, reason: str | None = None
    ) -> None:
        """The key holder refused: end the run with its reason.

        Reaching the privacy budget is the expected, clean way for a DP run to
        stop early: the run ends successfully with the rounds released so far.
        """
        text = str(error)
        reason = reason or getattr(error, "reason", None)
        self.record.info = {"refused": text, "reason": reason}
        if reason in RETRYABLE:
            cohort = f"attempt {self.attempt}: {', '.join(self.record.participants)} ({reason})"
            self.refused_cohorts.append(cohort)
            if self.attempt < self.settings.max_refused:
                # The round is not burnt: re-open it, every client retrains with fresh
                # noise (the refused decryption was charged by the key holder).
                log.warning("round %d refused by the key holder (%s); re-opening it", round, text)
                self.attempt += 1
                self._open(now)
                return
            self._finish(f"round {round} refused {self.attempt + 1} times by the key holder: "
                         + "; ".join(self.refused_cohorts), now, ok=False)  # fmt: skip
            return
        if reason == "budget_exceeded" or (reason is None and "budget_exceeded" in text):
            self.budget_exhausted = True
            self._finish(f"privacy budget reached: round {round} not released ({text}); "
                         f"{len(self.history)} rounds completed", now, ok=True)  # fmt: skip
        else:
            earlier = f"; refused before: {'; '.join(self.refused_cohorts)}"
            self._finish(f"key holder refused round {round}: {text}"
                         + (earlier if self.refused_cohorts else ""), now, ok=False)  # fmt: skip

    def _finish(self, outcome: str, now: float, *, ok: bool) -> None:
        self.phase = "finished"
        self.outcome = outcome
        self.ok = ok
        (log.info if ok else log.error)("run %s finished: %s", self.settings.run, outcome)
