"""The audit's report: what :func:`secure_xfl.privacy.audit.audit` found, as JSON and a table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATUSES", "AuditReport"]

#: Report statuses: ``OK`` (exit 0); ``FAIL`` (budget or claims, exit 1); ``NO_PRIVACY``
#: (a round decrypted without any noise, exit 1 unless allowed); ``EMPTY`` (nothing to
#: audit, exit 1); ``INVALID`` (not authentic or not intact, exit 2).
STATUSES = ("OK", "FAIL", "NO_PRIVACY", "EMPTY", "INVALID")


def _num(x: float | None) -> float | str | None:
    """JSON-safe number: infinity is written as the string ``"inf"``."""
    return x if x is None or math.isfinite(x) else "inf"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else ("inf" if math.isinf(x) else f"{x:.4f}")


@dataclass(frozen=True)
class AuditReport:
    """Outcome of :func:`audit`."""

    ok: bool
    """True exactly when ``exit_code`` is 0."""
    exit_code: int
    """0 authentic, intact, within budget; 1 a policy problem; 2 not authentic/intact."""
    ledger: str
    """Path of the audited ledger."""
    run: str | None
    """The audited run (None when the ledger could not be read or is empty)."""
    rounds: int
    """Number of released aggregates of the run."""
    delta: float | None
    """δ the ε figures are given at."""
    budget: float | None
    """ε budget checked against, if any."""
    epsilon: dict[str, float | None]
    """Federation ε: ``{"rdp": …, "prv": …}``; ``prv`` is None when unavailable."""
    claimed_epsilon: float | None
    """ε the key holder claimed in the run's last entry (inf for an unbounded claim)."""
    per_client: dict[str, dict[str, Any]]
    """``{client: {"rounds": n, "epsilon": {"rdp": …, "prv": …}}}``; ``rounds`` counts
    the client's charged decryptions, released and refused."""
    problems: list[str] = field(default_factory=list)
    """Reasons for a non-zero exit code."""
    notes: list[str] = field(default_factory=list)
    """Informational remarks that do not change the exit code."""
    per_round: list[dict[str, Any]] = field(default_factory=list)
    """Per entry: ``round``, ``outcome``, ``reason`` (refused only, else None),
    ``participants``, ``sample_rate``, ``recorded_sigma``, ``signed_sigma`` /
    ``signed_sensitivity`` (recomputed from the statements; None without them),
    ``sigma_used`` (what ε was computed from), ``claimed_epsilon`` and ``epsilon``
    (recomputed federation ε after the entry, RDP, at the entry's δ),
    ``claimed_client_epsilon`` (None when the entry makes no such claim) and
    ``client_epsilon`` (recomputed largest participant's ε after the entry)."""
    signer: str | None = None
    """SPIFFE id of the ledger's signer, when checked against the CA."""
    refused: int = 0
    """Refused decryptions of the run (charged in ε like released ones)."""
    refusals: list[dict[str, Any]] = field(default_factory=list)
    """Per round with refusals: ``{"round", "attempts", "reasons"}`` in file order."""
    status: str = "OK"
    """One of :data:`STATUSES`."""
    per_silo: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Record-level DP per silo, recomputed from its signed DP-SGD specs: ``{silo:
    {"rounds": n, "epsilon": {"pld": …, "rdp": …}}}`` (PLD primary, RDP cross-check)."""
    record_budget: float | None = None
    """Record-level ε budget each silo was checked against, if any."""
    record_rounds: list[dict[str, Any]] = field(default_factory=list)
    """Per entry with record-level specs: ``{"round": r, silo: ε (PLD) after it, …}``."""
    client_level: bool = True
    """Whether every decryption carried client-level noise (else its ε is unbounded and
    is not held to the budget; record-level DP is then what protects the silos)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; infinite values are the string ``"inf"``."""
        return {
            "ok": self.ok, "exit_code": self.exit_code, "ledger": self.ledger, "run": self.run,
            "rounds": self.rounds, "refused": self.refused, "delta": self.delta,
            "budget": self.budget, "signer": self.signer,
            "epsilon": {k: _num(v) for k, v in self.epsilon.items()},
            "claimed_epsilon": _num(self.claimed_epsilon),
            "per_client": {
                cid: {
                    "rounds": info["rounds"],
                    "epsilon": {k: _num(v) for k, v in info["epsilon"].items()},
                }
                for cid, info in self.per_client.items()
            },
            "per_round": [
                {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in self.per_round
            ],
            "refusals": [dict(r, reasons=list(r["reasons"])) for r in self.refusals],
            "problems": list(self.problems), "notes": list(self.notes),
            "status": self.status, "record_budget": self.record_budget,
            "client_level": self.client_level,
            "per_silo": {
                c: {"rounds": i["rounds"], "epsilon": {k: _num(v) for k, v in i["epsilon"].items()}}
                for c, i in self.per_silo.items()
            },
            "record_rounds": [
                {k: _num(v) if isinstance(v, float) else v for k, v in row.items()}
                for row in self.record_rounds
            ],
        }  # fmt: skip

    def table(self) -> str:
        """Human-readable summary."""
        status = {"FAIL": "FAIL (budget/claims)", "INVALID": "INVALID LEDGER"}.get(
            self.status, self.status
        )
        lines = [
            f"privacy audit of {self.ledger}",
            f"run: {self.run or '-'}   released: {self.rounds}   refused: {self.refused}   "
            f"delta: {self.delta}   budget: {'-' if self.budget is None else self.budget}",
            f"signer: {self.signer or 'not verified against a federation CA'}",
            f"status: {status} (exit {self.exit_code})",
            "",
        ]
        if self.per_silo:
            rb = "-" if self.record_budget is None else f"{self.record_budget:g}"
            lines += [
                f"record-level DP per silo (unit: one training block; budget {rb}; δ {self.delta})",
                f"{'silo':<12}  {'rounds':>6}  {'eps PLD':>10}  {'eps RDP':>10}",
                "-" * 44,
            ]
            for c, i in sorted(self.per_silo.items()):
                e = i["epsilon"]
                lines.append(
                    f"{c:<12}  {i['rounds']:>6}  {_fmt(e['pld']):>10}  {_fmt(e['rdp']):>10}"
                )
            lines += ["", "client-level DP (federation)" + (
                "" if self.client_level else ": off in some rounds (ε unbounded, not budgeted)"
            )]  # fmt: skip
        if self.exit_code != 2 and self.status != "EMPTY":
            width = max([10, *(len(c) for c in self.per_client)])
            lines.append(f"{'scope':<{width}}  {'charged':>7}  {'eps RDP':>10}  {'eps PRV':>10}")
            lines.append("-" * (width + 33))
            rows = [("federation", self.rounds + self.refused, self.epsilon)]
            rows += [(c, i["rounds"], i["epsilon"]) for c, i in sorted(self.per_client.items())]
            for name, n, eps in rows:
                lines.append(
                    f"{name:<{width}}  {n:>7}  {_fmt(eps['rdp']):>10}  {_fmt(eps['prv']):>10}"
                )
            lines += ["", f"claimed eps (last entry, RDP): {_fmt(self.claimed_epsilon)}"]
        if self.per_round:
            lines += ["", "round  outcome   clients  rate    sigma rec.  sigma signed  "
                      "eps claimed  eps         client eps claimed  client eps"]  # fmt: skip
            for r in self.per_round:
                lines.append(
                    f"{r['round']:>5}  {r['outcome']:<8}  {r['participants']:>7}  "
                    f"{r['sample_rate']:<6.4g}  {_fmt(r['recorded_sigma']):>10}  "
                    f"{_fmt(r['signed_sigma']):>12}  {_fmt(r['claimed_epsilon']):>11}  "
                    f"{_fmt(r['epsilon']):<10}  {_fmt(r['claimed_client_epsilon']):>18}  "
                    f"{_fmt(r['client_epsilon'])}"
                )
        if self.refusals:
            lines += ["", f"refused decryptions (charged): {self.refused}"]
            lines += [
                f"  round {r['round']}: {r['attempts']} refused ({', '.join(r['reasons'])})"
                for r in self.refusals
            ]
        lines.append("problems: " + ("none" if not self.problems else ""))
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
