"""A silo's own record-level privacy account: it decides σ_r and declines what would
pass its budget, and it survives restarts.

The client, not the aggregator, owns its records' budget. Before each round
:meth:`SiloAccount.plan` picks σ_r — the larger of the floor (plan and kit)
and the smallest σ that keeps the ε already spent plus the rest of the run
within the kit's target — and refuses the round with
:class:`RecordBudgetExhausted` when even that would pass the budget. Every
round is charged *before* training starts (:meth:`commit`), whether or not its
aggregate is ever decrypted, so a crash can only overcount. The state is a
small JSON file in the kit's state directory, replaced atomically (temporary
file, fsync, rename, fsync of the directory); a file that cannot be read is an
error, never a fresh start, because forgetting spent ε would be the one
unsafe way to fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_xfl.crypto.errors import EnvelopeError
from secure_xfl.crypto.recordspec import RecordDPFloor, RecordDPSpec
from secure_xfl.errors import PrivacyError
from secure_xfl.fsio import StorageError, atomic_write, read_bounded
from secure_xfl.privacy.accountant import AccountingError, calibrate_noise, epsilon

__all__ = ["STATE_FILE", "RecordBudgetExhausted", "SiloAccount", "SiloStateError"]

STATE_FILE = "record-dp.json"
_VERSION = 1
_MAX_BYTES = 8 * 1024 * 1024
_MAX_ENTRIES = 50_000
_KEYS = {"run", "round", "attempt", "sigma", "q", "steps", "clip"}
#: A derived σ_r above this trains nothing useful: the silo declines instead of
#: spending its last sliver of budget on noise.
MAX_DERIVED_SIGMA = 10.0


class SiloStateError(PrivacyError):
    """The silo's record-level accounting state is unreadable or invalid."""

    code = "privacy.silo_state"


class RecordBudgetExhausted(PrivacyError):
    """One more round would take this silo's records past its ε budget."""

    code = "privacy.record_budget"
    reason = "record_budget_exhausted"


def _entry(obj: Any, i: int) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        raise SiloStateError(f"entry {i} must have exactly the keys {sorted(_KEYS)}")
    if not isinstance(obj["run"], str) or not 0 < len(obj["run"]) <= 128:
        raise SiloStateError(f"entry {i}: run must be a short string")
    for k in ("round", "attempt", "steps"):
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
            raise SiloStateError(f"entry {i}: {k} must be a non-negative int")
    try:
        RecordDPSpec(obj["clip"], obj["sigma"], obj["q"], obj["steps"], 0.5)
    except EnvelopeError as exc:
        raise SiloStateError(f"entry {i}: {exc}") from None
    return obj


@dataclass
class SiloAccount:
    """Record-level DP-SGD rounds this silo ran, and its policy for the next one."""

    path: Path
    """State file (``KIT/state/record-dp.json``)."""
    delta: float
    """δ of the guarantee."""
    target: float
    """ε the run should end at (0: no derivation; σ_r comes from the floor only)."""
    budget: float
    """Hard ε limit across runs (0: none)."""
    rounds: int
    """Rounds in the run (the kit's ``federation.rounds``), for the σ_r derivation."""
    entries: list[dict[str, Any]] = field(default_factory=list)
    """Charged rounds, in order."""

    @classmethod
    def load(
        cls, path: Path, *, delta: float, target: float, budget: float, rounds: int
    ) -> SiloAccount:
        """Read the state (an absent file is an empty account)."""
        acct = cls(path, delta, target, budget, max(1, rounds))
        if not path.exists():
            return acct
        try:
            data = json.loads(read_bounded(path, _MAX_BYTES))
        except (StorageError, ValueError) as exc:
            raise SiloStateError(
                f"cannot read {path}: {exc}. It records the privacy this silo has spent: "
                "restore it, or move it away knowingly (the spent ε is then forgotten)"
            ) from None
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise SiloStateError(f"{path}: not a version-{_VERSION} record-level DP state")
        items = data.get("entries")
        if not isinstance(items, list) or len(items) > _MAX_ENTRIES:
            raise SiloStateError(f"{path}: entries must be a list of ≤ {_MAX_ENTRIES}")
        acct.entries = [_entry(e, i) for i, e in enumerate(items)]
        return acct

    def history(self) -> list[tuple[float, float, int]]:
        """(σ_r, q, steps) of every charged round."""
        return [(e["sigma"], e["q"], e["steps"]) for e in self.entries]

    def spent(self, method: Any = "pld") -> float:
        """Record-level ε spent so far."""
        return epsilon(self.history(), self.delta, method)

    def plan(
        self, floor: RecordDPFloor, *, run: str, round: int, sample_rate: float, steps: int
    ) -> RecordDPSpec:
        """The DP-SGD to run for ``round``, or :class:`RecordBudgetExhausted`."""
        trained = {e["round"] for e in self.entries if e["run"] == run and e["round"] != round}
        remaining = max(1, self.rounds - len(trained))
        sigma = floor.noise_multiplier
        history = self.history()
        if self.target > 0:
            try:
                derived = calibrate_noise(
                    self.target, sample_rate=sample_rate, steps=max(1, steps),
                    rounds=remaining, delta=self.delta, history=history,
                    max_sigma=MAX_DERIVED_SIGMA,
                )  # fmt: skip
            except AccountingError as exc:
                raise RecordBudgetExhausted(
                    f"round {round}: no σ_r keeps this silo within its target ε "
                    f"{self.target:g} (spent {self.spent():.4g}): {exc}"
                ) from None
            sigma = max(sigma, derived)
        spec = RecordDPSpec(
            max_grad_norm=floor.max_grad_norm, noise_multiplier=sigma,
            sample_rate=sample_rate, steps=steps, delta=self.delta,
        )  # fmt: skip
        if self.budget > 0:
            after = epsilon([*history, spec.history], self.delta, "pld")
            if not after <= self.budget:
                raise RecordBudgetExhausted(
                    f"round {round}: this silo's record-level ε would reach "
                    f"{after:.4g} > budget {self.budget:g} (spent {self.spent():.4g})"
                )
        return spec

    def commit(self, spec: RecordDPSpec, *, run: str, round: int, attempt: int) -> None:
        """Charge ``spec`` durably (before training starts)."""
        if len(self.entries) >= _MAX_ENTRIES:
            raise SiloStateError(f"{self.path} is full ({_MAX_ENTRIES} rounds)")
        entry = {
            "run": run, "round": round, "attempt": attempt, "sigma": spec.noise_multiplier,
            "q": spec.sample_rate, "steps": spec.steps, "clip": spec.max_grad_norm,
        }  # fmt: skip
        self._write([*self.entries, entry])
        self.entries.append(entry)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        body = json.dumps({"version": _VERSION, "entries": entries}, indent=1).encode()
        try:
            atomic_write(self.path, body)
        except StorageError as exc:
            # Charged before training: a charge that cannot be recorded means no round.
            raise SiloStateError(f"cannot record the record-level charge: {exc}") from exc

    def summary(self) -> str:
        """One line for logs."""
        eps = self.spent()
        shown = "inf" if math.isinf(eps) else f"{eps:.4g}"
        return f"record-level ε spent {shown} (budget {self.budget:g}, δ={self.delta:g})"
