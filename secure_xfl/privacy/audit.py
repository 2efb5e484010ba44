"""Privacy-budget audit of a run's ledger (``secure-xfl audit``).

The audit trusts nothing but the key holder's public key: it verifies every
line of the ledger (:func:`secure_xfl.privacy.ledger.read_ledger`), then
recomputes ε from the recorded mechanisms with the RDP and PRV accountants.

Two views of ε are reported:

* **federation** — every round of the run, each a Gaussian mechanism with
  the recorded σ_eff, subsampled at the recorded client sampling rate. The
  subsampling amplification assumes the cohort was a secret random sample.
* **per client** — only the rounds the client took part in, each at sample
  rate 1. Once the ledger (and the aggregator) know who took part, selection
  hides nothing, so amplification cannot be claimed; rounds a client sat out
  never touched its data and cost it nothing. This figure is valid whatever
  the selection process was, which is why it is also held to the budget.

Exit codes: 0 — ledger intact, every claim at least the recomputed ε and the
budget respected; 1 — budget exceeded, an ε claim understated, or another
policy problem in a correctly signed ledger; 2 — the ledger (or the key) is
unreadable, malformed, edited, reordered, cut in the middle or forged.
Cutting lines off the end cannot be seen in the chain; pass
``expected_entries`` or ``expected_head`` from an out-of-band record to catch it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_xfl.errors import PrivacyError
from secure_xfl.privacy.accountant import (
    PRVUnavailable,
    epsilon,
    rdp_curve,
    rdp_to_epsilon,
)
from secure_xfl.privacy.ledger import LedgerError, LedgerInvalid, read_ledger

__all__ = ["AuditError", "AuditReport", "audit", "main"]

# Claims are floats written by the same arithmetic; allow only round-off.
_CLAIM_RTOL = 1e-6


class AuditError(PrivacyError):
    """The audit was asked something it cannot answer (bad arguments, run choice)."""

    code = "privacy.audit"


def _num(x: float | None) -> float | str | None:
    """JSON-safe number: infinity is written as the string ``"inf"``."""
    if x is None or math.isfinite(x):
        return x
    return "inf"


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.4f}"


@dataclass(frozen=True)
class AuditReport:
    """Outcome of :func:`audit`."""

    ok: bool
    """True exactly when ``exit_code`` is 0."""
    exit_code: int
    """0 intact and within budget; 1 budget exceeded or claim understated; 2 invalid."""
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
    """``{client: {"rounds": n, "epsilon": {"rdp": …, "prv": …}}}``."""
    problems: list[str] = field(default_factory=list)
    """Reasons for a non-zero exit code."""
    notes: list[str] = field(default_factory=list)
    """Informational remarks that do not change the exit code."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; infinite values are the string ``"inf"``."""
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "ledger": self.ledger,
            "run": self.run,
            "rounds": self.rounds,
            "delta": self.delta,
            "budget": self.budget,
            "epsilon": {k: _num(v) for k, v in self.epsilon.items()},
            "claimed_epsilon": _num(self.claimed_epsilon),
            "per_client": {
                cid: {
                    "rounds": info["rounds"],
                    "epsilon": {k: _num(v) for k, v in info["epsilon"].items()},
                }
                for cid, info in self.per_client.items()
            },
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """Human-readable summary."""
        status = {0: "OK", 1: "FAIL (budget/claims)", 2: "INVALID LEDGER"}[self.exit_code]
        lines = [
            f"privacy audit of {self.ledger}",
            f"run: {self.run or '-'}   rounds: {self.rounds}   delta: {self.delta}   "
            f"budget: {'-' if self.budget is None else self.budget}",
            f"status: {status} (exit {self.exit_code})",
            "",
        ]
        if self.exit_code != 2:
            width = max([10, *(len(c) for c in self.per_client)])
            lines.append(f"{'scope':<{width}}  {'rounds':>6}  {'eps RDP':>10}  {'eps PRV':>10}")
            lines.append("-" * (width + 32))
            rows = [("federation", self.rounds, self.epsilon)]
            rows += [(c, i["rounds"], i["epsilon"]) for c, i in sorted(self.per_client.items())]
            for name, n, eps in rows:
                lines.append(
                    f"{name:<{width}}  {n:>6}  {_fmt(eps['rdp']):>10}  {_fmt(eps['prv']):>10}"
                )
            lines += ["", f"claimed eps (last entry, RDP): {_fmt(self.claimed_epsilon)}"]
        lines.append("problems: " + ("none" if not self.problems else ""))
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _invalid(path: str, reason: str, budget: float | None) -> AuditReport:
    return AuditReport(
        ok=False, exit_code=2, ledger=path, run=None, rounds=0, delta=None, budget=budget,
        epsilon={"rdp": None, "prv": None}, claimed_epsilon=None, per_client={},
        problems=[f"ledger invalid: {reason}"],
    )  # fmt: skip


def _both(history: list[tuple[float, float, int]], delta: float, with_prv: bool) -> dict[str, Any]:
    out: dict[str, float | None] = {"rdp": epsilon(history, delta, "rdp"), "prv": None}
    if with_prv:
        try:
            out["prv"] = epsilon(history, delta, "prv")
        except PRVUnavailable:
            out["prv"] = None
    return out


def _check_args(delta: float | None, budget: float | None) -> None:
    if delta is not None and not 0 < delta < 1:
        raise AuditError(f"delta must lie in (0, 1), got {delta}")
    if budget is not None and not (budget >= 0 and not math.isnan(budget)):
        raise AuditError(f"budget must be ≥ 0, got {budget}")


def audit(
    ledger_path: str | os.PathLike[str],
    keyholder_cert_path_or_public_key: Any,
    *,
    delta: float | None = None,
    budget: float | None = None,
    run: str | None = None,
    expected_entries: int | None = None,
    expected_head: str | None = None,
    prv: bool = True,
) -> AuditReport:
    """Verify a ledger and recompute the privacy spent by one run.

    ``delta`` defaults to the run's recorded δ (its last entry's). ``run`` may
    be omitted when the ledger holds at most one run; otherwise
    :class:`AuditError` is raised. ``prv=False`` skips the (slower) PRV figures.
    """
    _check_args(delta, budget)
    path = os.fspath(ledger_path)
    try:
        entries = read_ledger(
            path,
            keyholder_cert_path_or_public_key,
            expected_entries=expected_entries,
            expected_head=expected_head,
        )
    except LedgerInvalid as exc:
        return _invalid(path, str(exc), budget)
    except LedgerError as exc:
        return _invalid(path, f"cannot load key holder key: {exc}", budget)

    runs = sorted({e["run"] for e in entries})
    problems: list[str] = []
    notes: list[str] = []
    if run is None:
        if len(runs) > 1:
            raise AuditError(f"ledger holds {len(runs)} runs ({', '.join(runs)}); choose one")
        run = runs[0] if runs else None
    elif run not in runs:
        problems.append(f"run {run!r} has no entries in this ledger")
    mine = [e for e in entries if e["run"] == run]

    deltas = {e["delta"] for e in mine}
    if len(deltas) > 1:
        notes.append(f"delta changes within the run: {sorted(deltas)}")
    use_delta = delta if delta is not None else (mine[-1]["delta"] if mine else None)

    seen: set[int] = set()
    history: list[tuple[float, float, int]] = []
    running = rdp_curve([])
    for e in mine:
        if e["round"] in seen:
            problems.append(f"round {e['round']} was released more than once")
        seen.add(e["round"])
        realised = len(e["participants"]) / e["enrolled"]
        q = e["sample_rate"]
        if not math.isclose(q, realised, rel_tol=1e-9):
            problems.append(
                f"round {e['round']}: sample_rate {q} != participants/enrolled {realised:.6g}"
            )
            q = max(q, realised)  # never let a misreported rate lower ε
        if e["noise_multiplier"] == 0:
            notes.append(f"round {e['round']} was released without noise (ε unbounded)")
        history.append((e["noise_multiplier"], q, 1))
        # Each claim is checked at its own δ against the prefix it covers;
        # RDP composes additively, so the prefix curve is kept incrementally.
        running = running + rdp_curve([history[-1]])
        recomputed = rdp_to_epsilon(running, e["delta"])
        claimed = math.inf if e["epsilon"] is None else e["epsilon"]
        if claimed < recomputed * (1 - _CLAIM_RTOL) - 1e-12:
            problems.append(
                f"round {e['round']}: claimed ε {claimed:.6g} understates "
                f"recomputed ε {recomputed:.6g}"
            )

    fed: dict[str, float | None] = {"rdp": 0.0, "prv": 0.0}
    per_client: dict[str, dict[str, Any]] = {}
    if mine and use_delta is not None:
        fed = _both(history, use_delta, prv)
        if prv and fed["prv"] is None:
            notes.append("PRV accountant could not bound this run; see RDP figure")
        by_client: dict[str, list[float]] = {}
        for e in mine:
            for cid in e["participants"]:
                by_client.setdefault(cid, []).append(e["noise_multiplier"])
        cache: dict[tuple[float, ...], dict[str, Any]] = {}
        for cid, sigmas in sorted(by_client.items()):
            key = tuple(sorted(sigmas))
            if key not in cache:
                cache[key] = _both([(s, 1.0, 1) for s in key], use_delta, prv)
            per_client[cid] = {"rounds": len(sigmas), "epsilon": dict(cache[key])}

    if budget is not None:
        fed_rdp = fed["rdp"]
        if fed_rdp is not None and fed_rdp > budget:
            problems.append(f"federation ε {fed_rdp:.6g} exceeds budget {budget}")
        for cid, info in per_client.items():
            if info["epsilon"]["rdp"] > budget:
                problems.append(
                    f"client {cid}: ε {info['epsilon']['rdp']:.6g} exceeds budget {budget}"
                )

    code = 1 if problems else 0
    claimed_last: float | None = None
    if mine:
        claimed_last = math.inf if mine[-1]["epsilon"] is None else mine[-1]["epsilon"]
    return AuditReport(
        ok=code == 0, exit_code=code, ledger=path, run=run, rounds=len(mine), delta=use_delta,
        budget=budget, epsilon=fed, claimed_epsilon=claimed_last, per_client=per_client,
        problems=problems, notes=notes,
    )  # fmt: skip


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse exits the process on bad arguments; main() must return instead.
    def error(self, message: str) -> Any:
        raise _ArgumentError(message)


def _parser() -> _Parser:
    p = _Parser(
        prog="secure-xfl audit",
        description="Verify a privacy ledger and recompute the (ε, δ) it records.",
    )
    p.add_argument("ledger", metavar="LEDGER", help="privacy ledger (JSON Lines)")
    p.add_argument(
        "--cert", metavar="KEYHOLDER_CERT_PEM",
        help="key holder's PEM certificate or public key (default: keyholder-cert.pem beside "
        "the ledger, or the kit's cert.pem when the ledger is KIT/state/ledger.jsonl)",
    )  # fmt: skip
    p.add_argument("--delta", type=float, help="δ to report ε at (default: the ledger's)")
    p.add_argument("--budget", type=float, metavar="EPS", help="fail (exit 1) above this ε")
    p.add_argument("--run", help="run to audit (required if the ledger holds several)")
    p.add_argument("--expected-entries", type=int, help="entry count known out of band")
    p.add_argument("--expected-head", help="hash of the last line known out of band")
    p.add_argument("--no-prv", action="store_true", help="skip the PRV accountant")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _default_cert(ledger: Path) -> Path | None:
    """The key holder's certificate where secure-xfl puts it next to a ledger."""
    for candidate in (ledger.parent / "keyholder-cert.pem", ledger.parent.parent / "cert.pem"):
        if candidate.is_file():
            return candidate
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``secure-xfl audit``; returns the exit code (0, 1 or 2) instead of exiting."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    cert = args.cert or _default_cert(Path(args.ledger))
    if cert is None:
        print(f"{parser.prog}: error: no --cert given and none found beside the ledger",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        report = audit(
            args.ledger,
            cert,
            delta=args.delta,
            budget=args.budget,
            run=args.run,
            expected_entries=args.expected_entries,
            expected_head=args.expected_head,
            prv=not args.no_prv,
        )
    except AuditError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True, allow_nan=False))
    else:
        print(report.table())
    return report.exit_code
