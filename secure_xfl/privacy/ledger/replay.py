"""Replaying a run's ledger entries: what each decryption costs and whether its claims hold.

Every entry is charged, released or refused, with the σ_eff its signed client
statements support (:func:`~secure_xfl.privacy.ledger.verify_statements`), or
the recorded one when it carries none. Each entry's two claims — the
federation ``epsilon`` and the largest participant's ``client_epsilon`` — are
checked against the recomputed figures at the entry's δ, and the release rule
(refusals, then at most one release per round) against the order of entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from secure_xfl.privacy.accountant import rdp_to_epsilon
from secure_xfl.privacy.budget import PrivacyBudget
from secure_xfl.privacy.ledger.reader import StatementCheck, verify_statements
from secure_xfl.privacy.ledger.schema import outcome_of
from secure_xfl.privacy.record import RecordAccount

__all__ = ["Replay"]

# Claims are floats written by the same arithmetic; allow only round-off.
_CLAIM_RTOL = 1e-6


def _understated(claimed: float, recomputed: float) -> bool:
    return claimed < recomputed * (1 - _CLAIM_RTOL) - 1e-12


@dataclass
class Replay:
    """A run's entries replayed in file order (:meth:`entry`); the audit's findings so far."""

    acct: PrivacyBudget
    ca: x509.Certificate | None
    federation: str | None
    problems: list[str] = field(default_factory=list)
    forged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_round: list[dict[str, Any]] = field(default_factory=list)
    released: set[int] = field(default_factory=set)
    refusals: dict[int, list[str]] = field(default_factory=dict)
    unsigned: list[int] = field(default_factory=list)
    unclaimed: int = 0
    records: RecordAccount | None = None
    """Per-silo record-level histories, from verified statements only."""
    no_privacy: list[int] = field(default_factory=list)
    """Rounds decrypted with neither client-level noise nor record-level noise from
    every participant."""
    record_rows: list[dict[str, Any]] = field(default_factory=list)
    """Per entry with record-level specs: ``{"round": r, silo: ε (PLD) after it, …}``."""
    record_only: list[int] = field(default_factory=list)
    """Rounds protected by record-level DP only (no client-level noise)."""

    def _records(self, e: dict[str, Any], evidence: StatementCheck, r: int) -> bool:
        """Charge each silo's signed DP-SGD round; check the entry's record claims.
        True when every participant signed record-level DP with σ_r > 0."""
        if self.records is None:
            self.records = RecordAccount(self.acct.delta)
        specs = {c: s for c, s in evidence.records.items() if s is not None}
        for client, spec in specs.items():
            self.records.step(client, spec)
        claims = e.get("record_epsilon") or {}
        for client in sorted(set(claims) - set(specs)):
            self.problems.append(
                f"round {r}: record ε claimed for {client}, who signed no record-level DP"
            )
        row: dict[str, Any] = {"round": r}
        for client in sorted(specs):
            eps = self.records.epsilon(client)
            row[client] = eps
            if client in claims:
                claimed = math.inf if claims[client] is None else claims[client]
                if _understated(claimed, eps):
                    self.problems.append(
                        f"round {r}: claimed record ε {claimed:.6g} of {client} understates "
                        f"the recomputed {eps:.6g} (PLD)"
                    )
        if specs:
            self.record_rows.append(row)
        people = e["participants"]
        return bool(people) and all(c in specs and specs[c].noise_multiplier > 0 for c in people)

    def entry(self, e: dict[str, Any]) -> None:
        r, outcome = e["round"], outcome_of(e)
        if r in self.released:
            self.problems.append(
                f"round {r} was released more than once"
                if outcome == "released"
                else f"round {r}: a refused decryption is recorded after the round's release"
            )
        if outcome == "released":
            self.released.add(r)
        else:
            self.refusals.setdefault(r, []).append(e["reason"])
        realised = len(e["participants"]) / e["enrolled"]
        q = e["sample_rate"]
        if not math.isclose(q, realised, rel_tol=1e-9):
            self.problems.append(
                f"round {r}: sample_rate {q} != participants/enrolled {realised:.6g}"
            )
            q = max(q, realised)  # never let a misreported rate lower ε
        evidence = StatementCheck()
        if "statements" in e:
            evidence = verify_statements(e, self.ca, self.federation)
            self.problems += evidence.problems
            self.forged += evidence.forged
            # Unverifiable evidence supports no noise at all: ε is then unbounded.
            sigma = 0.0 if evidence.sigma is None else evidence.sigma
        else:
            self.unsigned.append(r)
            sigma = e["noise_multiplier"]
        record_noise = self._records(e, evidence, r) if not evidence.forged else False
        if sigma == 0 and not record_noise:
            self.no_privacy.append(r)
        elif sigma == 0:
            self.record_only.append(r)
        self.acct.step(sigma, q, e["participants"])
        # Each claim is checked at its own δ against the prefix it covers.
        fed = rdp_to_epsilon(self.acct.federation_rdp(), e["delta"])
        worst = max(rdp_to_epsilon(self.acct.client_rdp(p), e["delta"]) for p in e["participants"])
        claimed = math.inf if e["epsilon"] is None else e["epsilon"]
        claimed_c: float | None = None
        if "client_epsilon" in e:
            claimed_c = math.inf if e["client_epsilon"] is None else e["client_epsilon"]
        else:
            self.unclaimed += 1
        # With forged evidence ε is unbounded by construction; the forgery is the finding.
        if "statements" not in e or evidence.sigma is not None:
            if _understated(claimed, fed):
                self.problems.append(
                    f"round {r}: claimed ε {claimed:.6g} understates recomputed ε {fed:.6g}"
                )
            if claimed_c is not None and _understated(claimed_c, worst):
                self.problems.append(
                    f"round {r}: claimed client ε {claimed_c:.6g} understates the recomputed "
                    f"largest participant's ε {worst:.6g}"
                )
        self.per_round.append(
            {
                "round": r, "outcome": outcome, "reason": e.get("reason"),
                "participants": len(e["participants"]), "sample_rate": q,
                "recorded_sigma": e["noise_multiplier"], "signed_sigma": evidence.sigma,
                "signed_sensitivity": evidence.sensitivity, "sigma_used": sigma,
                "claimed_epsilon": claimed, "epsilon": fed,
                "claimed_client_epsilon": claimed_c, "client_epsilon": worst,
            }
        )  # fmt: skip
