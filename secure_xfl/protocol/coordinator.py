"""The aggregator's round logic as a sans-IO state machine.

Inputs are method calls (a client's hello, task request or upload; the key
holder's answer; the clock); outputs are return values and
:class:`DecryptRequest` actions. Nothing here touches a socket, a thread or the
wall clock, so unit tests drive whole runs in memory and the QUIC service is a
thin adapter around it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import tenseal as ts
import torch

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import flatten, layout_of, unflatten
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.envelope import ProtectedUpdate
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.errors import SecureXFLError, TrainingError
from secure_xfl.privacy.dp import DPConfig
from secure_xfl.protocol.rules import ServerRule

log = logging.getLogger(__name__)

Phase = Literal["collecting", "decrypting", "finished"]


class RoundClosed(TrainingError):
    """An upload arrived for a round that is not collecting any more."""

    code = "round_closed"


class NotEnrolled(TrainingError):
    """A peer that is not an enrolled client tried to take part."""

    code = "not_enrolled"


@dataclass(frozen=True)
class CoordinatorSettings:
    """What the aggregator needs to run rounds."""

    run: str
    """Run id."""
    rounds: int
    """Rounds to run."""
    min_clients: int
    """Smallest cohort the key holder accepts."""
    timeout_s: float
    """A round closes this long after opening if ≥ min_clients uploaded."""
    weighting: Literal["aggregator", "client"] = "aggregator"
    """Who applies weights (see UpdateStatement.weighting)."""
    weight_cap: float = 1e6
    """Public bound on weights; aggregator-side multipliers are weight / weight_cap."""
    announce: Mapping[str, Any] = field(default_factory=dict)
    """Extra round settings forwarded to clients (rule, local training, DP)."""
    buffered: bool = False
    """Buffered asynchronous aggregation: close a round once min_clients uploaded."""
    give_up_after_s: float = 0.0
    """Fail the run when a round has fewer than min_clients this long after opening
    (0 = the larger of three times ``timeout_s`` and 300 s, so slow starts survive)."""


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


class Coordinator:
    """Runs synchronous rounds over encrypted updates."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        ctx: ts.Context,
        preset: CKKSPreset,
        enrolled: Callable[[], Mapping[str, Any]],
        model: Mapping[str, np.ndarray],
        rule: ServerRule,
        now: float,
    ) -> None:
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
        self._open(now)

    # -- state ---------------------------------------------------------------------------
    def _quant(self) -> QuantSpec | None:
        """Packed presets: the quantisation every client of this round must sign."""
        if not self.preset.packed:
            return None
        a = self.settings.announce
        if self.settings.weighting != "client":
            raise TrainingError(f"preset {self.preset.name!r} needs client-side weighting")
        dp = DPConfig(
            clip_norm=float(a.get("clip_norm", 1.0)),
            noise_multiplier=float(a.get("noise_multiplier", 0.0)),
            min_clients=self.settings.min_clients,
            delta=float(a.get("delta", 1e-5)),
        )
        # Lane headroom for everyone enrolled now (at least the library default).
        return QuantSpec.for_dp(dp, max_clients=max(8, len(self.enrolled())))

    def _open(self, now: float) -> None:
        s = self.settings
        self.quant = self._quant()
        self.acc = Accumulator(
            ctx=self.ctx,
            preset=self.preset,
            run=s.run,
            round=self.round,
            layout_digest=self.layout.digest,
            numel=self.layout.numel,
            key_for=lambda name: self.enrolled()[name],
            weighting=s.weighting,
            weight_scale=s.weight_cap if s.weighting == "aggregator" else 1.0,
            quant=self.quant,
        )
        self.record = RoundRecord(round=self.round, opened_at=now)
        self.announced_at: float | None = None
        self.phase = "collecting"
        log.info("round %d open (run %s)", self.round, s.run)

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
        }

    def task(self, peer: str, after: int, now: float | None = None) -> tuple[str, dict[str, Any]]:
        """The round a client should work on next, ``wait`` or ``done``.

        The round's deadline runs from the first time it is handed to a client
        (``now``), not from when it opened: a cohort still starting up is not late.
        """
        self._check_peer(peer)
        if self.phase == "finished":
            return "done", {"reason": self.outcome, "rounds": len(self.history), "ok": self.ok}
        if self.phase != "collecting" or self.round <= after or peer in self.acc.clients:
            return "wait", {"retry_s": 0.2}
        s = self.settings
        if self.announced_at is None:
            self.announced_at = self.record.opened_at if now is None else now
        model = self.model()
        return "round", {
            "run": s.run,
            "round": self.round,
            "layout": self.layout.digest,
            "weighting": s.weighting,
            "weight_cap": s.weight_cap,
            "quant": None if self.quant is None else self.quant.to_wire(),
            "timeout_s": s.timeout_s,
            "settings": {
                **s.announce,
                "clients": sorted(self.enrolled()),
                "throughputs": dict(self.throughputs),
                "loss_ref": self.loss_ref,
            },
            "model": model,
        }

    def upload(
        self, peer: str, round: int, blob: bytes, throughput: float | None = None
    ) -> dict[str, Any]:
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
        self.acc.add(update, peer=peer)
        self.record.bytes_up += len(blob)
        log.info(
            "round %d: update from %s accepted (%d/%d)",
            self.round,
            peer,
            self.acc.count,
            len(self.enrolled()),
        )
        return {"round": self.round, "accepted": True, "count": self.acc.count}

    def note_download(self, nbytes: int) -> None:
        """Account bytes sent to clients (the adapter knows the encoded size)."""
        self.record.bytes_down += nbytes

    # -- clock and key holder ------------------------------------------------------------
    def tick(self, now: float) -> DecryptRequest | None:
        """Close the round when complete or past its deadline; maybe fail the run."""
        if self.phase != "collecting":
            return None
        s = self.settings
        count, enrolled = self.acc.count, len(self.enrolled())
        elapsed = now - self.record.opened_at
        # Buffered async releases a buffer as soon as it covers min_clients;
        # stragglers re-target the next buffer with a staleness discount.
        wanted = s.min_clients if s.buffered else max(enrolled, s.min_clients)
        complete = count >= wanted
        late = (
            self.announced_at is not None
            and now - self.announced_at >= s.timeout_s
            and count >= s.min_clients
        )
        if complete or late:
            self.phase = "decrypting"
            self.record.closed_at = now
            self.record.participants = tuple(sorted(self.acc.clients))
            log.info(
                "round %d closed with %d clients%s",
                self.round,
                count,
                " at the deadline" if late and not complete else "",
            )
            return DecryptRequest(self.round, self.acc.result().encode())
        give_up = s.give_up_after_s or max(3 * s.timeout_s, 300.0)
        if elapsed >= give_up:
            self._finish(
                f"round {self.round} had {count} < min_clients {s.min_clients} uploads "
                f"after {elapsed:.0f}s",
                now,
                ok=False,
            )
        return None

    def decrypted(
        self, round: int, average: np.ndarray, info: Mapping[str, Any], now: float
    ) -> None:
        """The key holder's weighted average arrived: apply the rule, open the next round."""
        if self.phase != "decrypting" or round != self.round:
            raise TrainingError(f"unexpected decryption result for round {round}")
        if average.shape != self.params.shape:
            raise TrainingError("decrypted aggregate has the wrong length")
        self.params = self.rule.apply(self.params, average)
        losses = [
            s.statement.loss for s in self.acc.result_manifest() if s.statement.loss is not None
        ]
        if losses:
            self.loss_ref = min(losses)
        self.record.finished_at = now
        self.record.info = dict(info)
        self.history.append(self.record)
        self.round += 1
        if self.round >= self.settings.rounds:
            self._finish("completed", now, ok=True)
        else:
            self._open(now)

    def decrypt_failed(self, round: int, error: SecureXFLError | str, now: float) -> None:
        """The key holder refused: end the run with its reason.

        Reaching the privacy budget is the expected, clean way for a DP run to
        stop early: the run ends successfully with the rounds released so far.
        """
        text = str(error)
        self.record.info = {"refused": text}
        if "budget_exceeded" in text:
            self.budget_exhausted = True
            self._finish(
                f"privacy budget reached: round {round} not released ({text}); "
                f"{len(self.history)} rounds completed",
                now,
                ok=True,
            )
        else:
            self._finish(f"key holder refused round {round}: {text}", now, ok=False)

    def _finish(self, outcome: str, now: float, *, ok: bool) -> None:
        self.phase = "finished"
        self.outcome = outcome
        self.ok = ok
        (log.info if ok else log.error)("run %s finished: %s", self.settings.run, outcome)
