"""Per-silo record-level ε from signed DP-SGD specs: one arithmetic for key holder and audit.

Each silo's record-level guarantee composes the DP-SGD rounds it signed
(:class:`~secure_xfl.crypto.recordspec.RecordDPSpec`: σ_r, Poisson rate q,
steps) over every decryption its update was part of, released or refused:
the key holder saw both. The primary figure is the PLD accountant of Google's
dp-accounting; the RDP accountant (Opacus's arithmetic) is the cross-check.
Rounds a silo trained but whose aggregate was never decrypted released
nothing and are not in the ledger; the silo's own account
(:mod:`secure_xfl.privacy.silo`) charges them anyway, so its figure is an
upper bound of the one the audit recomputes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack

from secure_xfl.crypto.envelope import SignedStatement
from secure_xfl.crypto.errors import EnvelopeError
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.privacy.accountant import AccountingError, Method, epsilon

__all__ = ["RecordAccount", "statement_records"]

Triple = tuple[float, float, int]


class RecordAccount:
    """Record-level DP-SGD histories of every silo, at one δ."""

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise AccountingError(f"delta must lie in (0, 1), got {delta!r}")
        self.delta = float(delta)
        self._hist: dict[str, list[Triple]] = {}
        self._cache: dict[tuple[tuple[Triple, ...], Method], float] = {}

    def copy(self) -> RecordAccount:
        """An independent copy."""
        out = RecordAccount(self.delta)
        out._hist = {c: list(h) for c, h in self._hist.items()}
        out._cache = self._cache  # values depend only on the key: safe to share
        return out

    def step(self, client: str, spec: RecordDPSpec) -> None:
        """Charge one decryption that contained ``client``'s update trained under ``spec``."""
        self._hist.setdefault(client, []).append(spec.history)

    def clients(self) -> list[str]:
        """Silos with at least one charged round, sorted."""
        return sorted(self._hist)

    def rounds(self, client: str) -> int:
        """Charged decryptions of ``client``."""
        return len(self._hist.get(client, ()))

    def history(self, client: str) -> list[Triple]:
        """``client``'s (σ_r, q, steps) triples, in order."""
        return list(self._hist.get(client, ()))

    def _eps(self, hist: Sequence[Triple], method: Method) -> float:
        key = (tuple(hist), method)
        if key not in self._cache:
            self._cache[key] = epsilon(list(hist), self.delta, method)
        return self._cache[key]

    def epsilon(self, client: str, method: Method = "pld") -> float:
        """``client``'s record-level ε at :attr:`delta` (0 before any round)."""
        return self._eps(self._hist.get(client, ()), method)

    def projected(
        self, specs: Mapping[str, RecordDPSpec], method: Method = "pld"
    ) -> dict[str, float]:
        """Each silo's ε if one more decryption with these specs were charged."""
        return {c: self._eps([*self._hist.get(c, ()), s.history], method) for c, s in specs.items()}

    def over_budget(self, budget: float, specs: Mapping[str, RecordDPSpec]) -> str | None:
        """Why charging ``specs`` would take a silo past ``budget`` (None: it fits)."""
        if not budget > 0:
            return None
        after = self.projected(specs)
        over = sorted(c for c, e in after.items() if e > budget)
        if not over:
            return None
        return "; ".join(f"silo {c} record ε would reach {after[c]:.4g} > {budget:g}" for c in over)

    @classmethod
    def from_entries(cls, entries: Iterable[Mapping[str, Any]], delta: float) -> RecordAccount:
        """Histories from ledger entries the caller already verified (or wrote itself)."""
        acct = cls(delta)
        for e in entries:
            for client, spec in statement_records(e).items():
                if spec is not None:
                    acct.step(client, spec)
        return acct


def statement_records(entry: Mapping[str, Any]) -> dict[str, RecordDPSpec | None]:
    """The record-level spec each participant of a ledger entry signed (no verification:
    use :func:`~secure_xfl.privacy.ledger.verify_statements` for untrusted ledgers)."""
    out: dict[str, RecordDPSpec | None] = {}
    for item in entry.get("statements") or ():
        try:
            obj = msgpack.unpackb(bytes.fromhex(item["signed"]), raw=False)
            out[item["client"]] = SignedStatement.from_wire(obj).statement.record
        except (EnvelopeError, ValueError, TypeError, msgpack.UnpackException):
            out[item["client"]] = None
    return out
