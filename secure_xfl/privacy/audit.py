"""Privacy-budget audit of a run's ledger (the library behind ``secure-xfl audit``).

The audit trusts the key holder only for the *fact* of a release. It verifies
every line of the ledger (:func:`secure_xfl.privacy.ledger.read_ledger`) and,
given the federation CA (``ca``), that the ledger's signer holds a
``keyholder`` certificate of that CA and that every released round carries a
signed statement of each participant from a ``client`` certificate of the
same CA. It recomputes σ_eff and the sensitivity of each release from the DP
specs the clients signed (:func:`secure_xfl.crypto.dpspec.effective_noise`)
and ε from that σ, never from the σ the key holder recorded.

Two views of ε are reported (see :mod:`secure_xfl.privacy.budget`): the
**federation** figure (subsampled at the recorded client sampling rate) and
the **per client** figure (only its rounds, at rate 1). Both are held to the
budget.

Exit codes: 0 — ledger intact, every claim at least the recomputed ε, the
budget respected; 1 — budget exceeded, an ε claim understated, a recorded σ,
sensitivity or δ the signed statements do not support, a statement for
another run or round, a round without signed statements (under ``ca``), or
another policy problem in a correctly signed ledger; 2 — the ledger (or a
key) is unreadable, malformed, edited, reordered, cut in the middle or
forged: signed by a key that is not the federation's key holder, or carrying
a client statement that is unreadable, whose signature does not verify or
whose certificate is not the participant's client certificate from the CA.
Certificates are checked at the time the entry records (the release); no CRL
is consulted, since a later revocation does not undo what a key signed.
Cutting lines off the end cannot be seen in the chain; pass
``expected_entries`` or ``expected_head`` from an out-of-band record to catch it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from secure_xfl.crypto import pki
from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.errors import PrivacyError
from secure_xfl.privacy.accountant import PRVUnavailable, rdp_to_epsilon
from secure_xfl.privacy.budget import PrivacyBudget
from secure_xfl.privacy.ledger import (
    LedgerError,
    LedgerInvalid,
    StatementCheck,
    as_certificate,
    read_ledger,
    verify_signer,
    verify_statements,
)

__all__ = ["AuditError", "AuditReport", "audit"]

# Claims are floats written by the same arithmetic; allow only round-off.
_CLAIM_RTOL = 1e-6
_NO_CA = "no federation CA: the ledger's signer and the client statements were not checked"


class AuditError(PrivacyError):
    """The audit was asked something it cannot answer (bad arguments, run choice)."""

    code = "privacy.audit"


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
    """0 intact and within budget; 1 a policy problem (see module doc); 2 invalid/forged."""
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
    per_round: list[dict[str, Any]] = field(default_factory=list)
    """Per entry: ``round``, ``participants``, ``sample_rate``, ``recorded_sigma``,
    ``signed_sigma`` / ``signed_sensitivity`` (recomputed from the statements; None
    without them), ``sigma_used`` (what ε was computed from), ``claimed_epsilon`` and
    ``epsilon`` (recomputed federation ε after the round, RDP, at the entry's δ)."""
    signer: str | None = None
    """SPIFFE id of the ledger's signer, when checked against the CA."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; infinite values are the string ``"inf"``."""
        return {
            "ok": self.ok, "exit_code": self.exit_code, "ledger": self.ledger, "run": self.run,
            "rounds": self.rounds, "delta": self.delta, "budget": self.budget,
            "signer": self.signer,
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
            "problems": list(self.problems), "notes": list(self.notes),
        }  # fmt: skip

    def table(self) -> str:
        """Human-readable summary."""
        status = {0: "OK", 1: "FAIL (budget/claims)", 2: "INVALID LEDGER"}[self.exit_code]
        lines = [
            f"privacy audit of {self.ledger}",
            f"run: {self.run or '-'}   rounds: {self.rounds}   delta: {self.delta}   "
            f"budget: {'-' if self.budget is None else self.budget}",
            f"signer: {self.signer or 'not verified against a federation CA'}",
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
        if self.per_round:
            lines += ["", "round  clients  rate    sigma rec.  sigma signed  eps claimed  eps"]
            for r in self.per_round:
                lines.append(
                    f"{r['round']:>5}  {r['participants']:>7}  {r['sample_rate']:<6.4g}  "
                    f"{_fmt(r['recorded_sigma']):>10}  {_fmt(r['signed_sigma']):>12}  "
                    f"{_fmt(r['claimed_epsilon']):>11}  {_fmt(r['epsilon'])}"
                )
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


# ------------------------------------------------------------------------ audit


def _both(budget: PrivacyBudget, client: str | None, with_prv: bool) -> dict[str, float | None]:
    def one(method: Any) -> float:
        if client is None:
            return budget.federation_epsilon(method)
        return budget.client_epsilon(client, method)

    out: dict[str, float | None] = {"rdp": one("rdp"), "prv": None}
    if with_prv:
        try:
            out["prv"] = one("prv")
        except PRVUnavailable:
            out["prv"] = None
    return out


def _check_args(delta: float | None, budget: float | None) -> None:
    if delta is not None and not 0 < delta < 1:
        raise AuditError(f"delta must lie in (0, 1), got {delta}")
    if budget is not None and not (budget >= 0 and not math.isnan(budget)):
        raise AuditError(f"budget must be ≥ 0, got {budget}")


def _load_ca(ca: Any) -> x509.Certificate:
    if isinstance(ca, x509.Certificate):
        return ca
    cert = as_certificate(ca)
    if cert is None:
        raise pki.PkiFileError("not a PEM certificate")
    return cert


def audit(
    ledger_path: str | os.PathLike[str],
    keyholder_cert_path_or_public_key: Any,
    *,
    ca: str | os.PathLike[str] | x509.Certificate | None = None,
    delta: float | None = None,
    budget: float | None = None,
    run: str | None = None,
    expected_entries: int | None = None,
    expected_head: str | None = None,
    prv: bool = True,
) -> AuditReport:
    """Verify a ledger and recompute the privacy spent by one run.

    ``ca`` is the federation CA (path, PEM or certificate): with it the signer
    must be its key holder and every entry must carry the participants'
    statements signed under its client certificates; without it only the
    ledger's own signature chain is checked and a note says so. ``delta``
    defaults to the run's recorded δ (its last entry's). ``run`` may be omitted
    when the ledger holds at most one run; otherwise :class:`AuditError` is
    raised. ``prv=False`` skips the (slower) PRV figures.
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

    ca_cert: x509.Certificate | None = None
    signer: pki.PeerIdentity | None = None
    if ca is not None:
        try:
            ca_cert = _load_ca(ca)
        except (OSError, ValueError, pki.PkiError) as exc:
            return _invalid(path, f"cannot load the federation CA: {exc}", budget)
        try:
            signer = verify_signer(keyholder_cert_path_or_public_key, ca_cert, entries)
        except (OSError, ValueError, pki.PkiError) as exc:
            # E.g. a ledger re-signed with an enrolled client's key and shipped
            # with that client's genuine certificate: a real cert, wrong role.
            return _invalid(path, f"signer is not the federation's key holder: {exc}", budget)

    runs = sorted({e["run"] for e in entries})
    problems: list[str] = []
    forged: list[str] = []
    notes: list[str] = [] if ca_cert is not None else [_NO_CA]
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
    acct = PrivacyBudget(run or "", DEFAULT_DELTA if use_delta is None else use_delta)

    seen: set[int] = set()
    per_round: list[dict[str, Any]] = []
    unsigned: list[int] = []
    for e in mine:
        r = e["round"]
        if r in seen:
            problems.append(f"round {r} was released more than once")
        seen.add(r)
        realised = len(e["participants"]) / e["enrolled"]
        q = e["sample_rate"]
        if not math.isclose(q, realised, rel_tol=1e-9):
            problems.append(f"round {r}: sample_rate {q} != participants/enrolled {realised:.6g}")
            q = max(q, realised)  # never let a misreported rate lower ε
        evidence = StatementCheck()
        if "statements" in e:
            evidence = verify_statements(e, ca_cert, signer.federation if signer else None)
            problems += evidence.problems
            forged += evidence.forged
            # Unverifiable evidence supports no noise at all: ε is then unbounded.
            sigma = 0.0 if evidence.sigma is None else evidence.sigma
        else:
            unsigned.append(r)
            sigma = e["noise_multiplier"]
        if sigma == 0:
            notes.append(f"round {r} was released without (verified) noise: ε unbounded")
        acct.step(sigma, q, e["participants"])
        # Each claim is checked at its own δ against the prefix it covers.
        recomputed = rdp_to_epsilon(acct.federation_rdp(), e["delta"])
        claimed = math.inf if e["epsilon"] is None else e["epsilon"]
        # With forged evidence ε is unbounded by construction; the forgery is the finding.
        verified = "statements" not in e or evidence.sigma is not None
        if verified and claimed < recomputed * (1 - _CLAIM_RTOL) - 1e-12:
            problems.append(
                f"round {r}: claimed ε {claimed:.6g} understates recomputed ε {recomputed:.6g}"
            )
        per_round.append(
            {
                "round": r, "participants": len(e["participants"]), "sample_rate": q,
                "recorded_sigma": e["noise_multiplier"], "signed_sigma": evidence.sigma,
                "signed_sensitivity": evidence.sensitivity, "sigma_used": sigma,
                "claimed_epsilon": claimed, "epsilon": recomputed,
            }
        )  # fmt: skip
    for r in unsigned:
        msg = f"round {r}: no signed client statements; σ taken on the key holder's word"
        (problems if ca_cert is not None else notes).append(msg)

    fed: dict[str, float | None] = {"rdp": 0.0, "prv": 0.0}
    per_client: dict[str, dict[str, Any]] = {}
    if mine and use_delta is not None:
        fed = _both(acct, None, prv)
        if prv and fed["prv"] is None:
            notes.append("PRV accountant could not bound this run; see RDP figure")
        cache: dict[tuple[float, ...], dict[str, float | None]] = {}
        for cid in acct.clients():
            # Clients with the same σ history share one figure (PRV is slow).
            key = tuple(sorted(s for s, _, _ in acct.client_history(cid)))
            if key not in cache:
                cache[key] = _both(acct, cid, prv)
            per_client[cid] = {"rounds": acct.client_rounds(cid), "epsilon": dict(cache[key])}

    if budget is not None:
        fed_rdp = fed["rdp"]
        if fed_rdp is not None and fed_rdp > budget:
            problems.append(f"federation ε {fed_rdp:.6g} exceeds budget {budget}")
        for cid, info in per_client.items():
            if info["epsilon"]["rdp"] > budget:
                problems.append(
                    f"client {cid}: ε {info['epsilon']['rdp']:.6g} exceeds budget {budget}"
                )

    code = 2 if forged else 1 if problems else 0
    claimed_last: float | None = None
    if mine:
        claimed_last = math.inf if mine[-1]["epsilon"] is None else mine[-1]["epsilon"]
    return AuditReport(
        ok=code == 0, exit_code=code, ledger=path, run=run, rounds=len(mine), delta=use_delta,
        budget=budget, epsilon=fed, claimed_epsilon=claimed_last, per_client=per_client,
        problems=[f"forged: {f}" for f in forged] + problems, notes=notes,
        per_round=per_round, signer=None if signer is None else signer.spiffe_id,
    )  # fmt: skip
