"""Privacy-budget audit of a run's ledger (the library behind ``secure-xfl audit``).

The audit trusts the key holder only for the *fact* of a decryption. It
verifies every line of the ledger (:func:`secure_xfl.privacy.ledger.read_ledger`)
and, against the federation CA (``ca``) the auditor brings, that the ledger's
signer holds a ``keyholder`` certificate of that CA's federation, valid at
every entry and not on the CA's CRL (:func:`~secure_xfl.privacy.ledger.verify_signer`),
and that every entry carries a signed statement of each participant from a
``client`` certificate of the same CA. It recomputes σ_eff and the sensitivity
of each decryption from the DP specs the clients signed
(:func:`secure_xfl.crypto.dpspec.effective_noise`) and ε from that σ, never
from the σ the key holder recorded. Without a CA nothing shows who signed the
ledger, so it is not called authentic (exit 2) unless the caller vouches for
the key itself (``trust_key_only=True``).

Every decryption is charged: a *refused* entry (decrypted, failed validation,
withheld, the round retried with fresh noise) costs ε exactly like a released
one. Two views of ε are reported (see :mod:`secure_xfl.privacy.budget`): the
**federation** figure (subsampled at the recorded client sampling rate) and
the **per client** figure (only its decryptions, at rate 1). Both are held to
the budget, and both claims an entry makes (``epsilon``, ``client_epsilon``)
are checked against the recomputed figures.

Exit codes: 0 — ledger authentic and intact, every claim at least the
recomputed ε, the budget respected; 1 — budget exceeded, an ε or client-ε
claim understated, a round released more than once or refused after its
release, a recorded σ, sensitivity or δ the signed statements do not support,
a statement for another run or round, a round without signed statements, or
another policy problem in an authentic ledger; 2 — not authentic or not
intact: no CA given, the ledger (or a key, the CA, the CRL) unreadable,
malformed, edited, reordered, cut in the middle, or signed by any key but the
federation key holder's certified, unrevoked one, or carrying a client
statement that is unreadable, whose signature does not verify or whose
certificate is not the participant's client certificate from the CA. Client
certificates are checked at the time the entry records, without the CRL (a
later revocation does not undo what a client signed; the key holder checked
revocation when it decrypted). Cutting lines off the end cannot be seen in
the chain; pass ``expected_entries`` or ``expected_head`` from an out-of-band
record to catch it.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from secure_xfl.crypto import pki
from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.errors import PrivacyError
from secure_xfl.privacy.accountant import PRVUnavailable
from secure_xfl.privacy.budget import PrivacyBudget
from secure_xfl.privacy.ledger import (
    LedgerError,
    LedgerInvalid,
    load_ca,
    load_crl,
    read_ledger,
    verify_signer,
)
from secure_xfl.privacy.ledger.replay import Replay

__all__ = ["NO_CA", "AuditError", "AuditReport", "audit"]

NO_CA = (
    "no federation CA given, so nothing shows the ledger was signed by the federation's "
    "key holder; pass the CA: secure-xfl audit LEDGER --ca CA_PEM (or --kit KIT_DIR)"
)
_KEY_ONLY = "no federation CA (trust_key_only): the ledger's signer and the client statements "
_KEY_ONLY += "were not checked against a CA"


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
        }  # fmt: skip

    def table(self) -> str:
        """Human-readable summary."""
        status = {0: "OK", 1: "FAIL (budget/claims)", 2: "INVALID LEDGER"}[self.exit_code]
        lines = [
            f"privacy audit of {self.ledger}",
            f"run: {self.run or '-'}   released: {self.rounds}   refused: {self.refused}   "
            f"delta: {self.delta}   budget: {'-' if self.budget is None else self.budget}",
            f"signer: {self.signer or 'not verified against a federation CA'}",
            f"status: {status} (exit {self.exit_code})",
            "",
        ]
        if self.exit_code != 2:
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


def _invalid(path: str, reason: str, budget: float | None) -> AuditReport:
    return AuditReport(
        ok=False, exit_code=2, ledger=path, run=None, rounds=0, delta=None, budget=budget,
        epsilon={"rdp": None, "prv": None}, claimed_epsilon=None, per_client={},
        problems=[reason],
    )  # fmt: skip


# ------------------------------------------------------------------------ trust


def _crl_for(ca: Any, crl: Any) -> x509.CertificateRevocationList:
    """The CRL given, or ``crl.pem`` beside a CA given as a path."""
    if crl is None:
        beside = None
        if isinstance(ca, str | os.PathLike) and not str(ca).lstrip().startswith("-----"):
            beside = Path(ca).parent / "crl.pem"
        if beside is None or not beside.is_file():
            raise pki.PkiFileError(
                "no CRL: the key holder's certificate cannot be checked for revocation; "
                "pass crl= (secure-xfl audit --crl CRL_PEM) or put crl.pem beside the CA"
            )
        crl = beside
    return load_crl(crl)


def _signer(
    cert: Any, ca: Any, crl: Any, federation: str | None, entries: Sequence[dict[str, Any]]
) -> tuple[x509.Certificate, pki.PeerIdentity, list[str]]:
    """(CA, signer, notes), or :class:`pki.PkiError` saying why the signer is not trusted."""
    ca_cert = load_ca(ca)
    revocations = _crl_for(ca, crl)
    try:
        signer = verify_signer(cert, ca_cert, entries, crl=revocations, federation=federation)
    except pki.PkiError as exc:
        # E.g. a ledger re-signed with an enrolled client's key and shipped with
        # that client's genuine certificate: a real cert, wrong role.
        raise pki.PkiError(f"signer is not the federation's key holder: {exc}") from exc
    notes = []
    stale = revocations.next_update_utc
    if stale is not None and stale < _dt.datetime.now(_dt.UTC):
        notes.append(
            f"the CRL is past its nextUpdate ({stale:%Y-%m-%d}): revocations published "
            "since then may be missing; audit against a fresh CRL"
        )
    return ca_cert, signer, notes


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


def audit(
    ledger_path: str | os.PathLike[str],
    keyholder_cert_path_or_public_key: Any,
    *,
    ca: str | os.PathLike[str] | x509.Certificate | None = None,
    crl: str | os.PathLike[str] | x509.CertificateRevocationList | None = None,
    federation: str | None = None,
    trust_key_only: bool = False,
    delta: float | None = None,
    budget: float | None = None,
    run: str | None = None,
    expected_entries: int | None = None,
    expected_head: str | None = None,
    prv: bool = True,
) -> AuditReport:
    """Verify a ledger and recompute the privacy spent by one run.

    ``ca`` is the federation CA (path, PEM or certificate): the signer must be
    its key holder, unrevoked by ``crl`` (path, PEM or CRL; default ``crl.pem``
    beside a CA given as a path; none found is exit 2), in ``federation`` (the
    auditor's kit's; default the CA's own), and every entry must carry the
    participants' statements signed under the CA's client certificates.
    Without ``ca`` the report is exit 2 (:data:`NO_CA`) unless
    ``trust_key_only=True``: then the given key is taken as the key holder's
    and only the ledger's own signature chain is checked, which a note says.
    ``delta`` defaults to the run's recorded δ (its last entry's). ``run`` may be
    omitted when the ledger holds at most one run; otherwise :class:`AuditError`
    is raised. ``prv=False`` skips the (slower) PRV figures.
    """
    _check_args(delta, budget)
    path = os.fspath(ledger_path)
    if ca is None and not trust_key_only:
        return _invalid(path, f"not authenticated: {NO_CA}", budget)
    try:
        entries = read_ledger(
            path,
            keyholder_cert_path_or_public_key,
            expected_entries=expected_entries,
            expected_head=expected_head,
        )
    except LedgerInvalid as exc:
        return _invalid(path, f"ledger invalid: {exc}", budget)
    except LedgerError as exc:
        return _invalid(path, f"ledger invalid: cannot load key holder key: {exc}", budget)

    ca_cert: x509.Certificate | None = None
    signer: pki.PeerIdentity | None = None
    notes: list[str] = [_KEY_ONLY]
    if ca is not None:
        try:
            ca_cert, signer, notes = _signer(
                keyholder_cert_path_or_public_key, ca, crl, federation, entries
            )
        except (OSError, ValueError, pki.PkiError) as exc:
            return _invalid(path, f"ledger invalid: {exc}", budget)

    runs = sorted({e["run"] for e in entries})
    problems: list[str] = []
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
    walk = Replay(
        PrivacyBudget(run or "", DEFAULT_DELTA if use_delta is None else use_delta),
        ca_cert, signer.federation if signer else None, problems=problems, notes=notes,
    )  # fmt: skip
    for e in mine:
        walk.entry(e)
    acct = walk.acct
    for r in walk.unsigned:
        msg = f"round {r}: no signed client statements; σ taken on the key holder's word"
        (problems if ca_cert is not None else notes).append(msg)
    if walk.unclaimed:
        notes.append(f"{walk.unclaimed} entries claim no client_epsilon (not checked)")

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

    code = 2 if walk.forged else 1 if problems else 0
    claimed_last: float | None = None
    if mine:
        claimed_last = math.inf if mine[-1]["epsilon"] is None else mine[-1]["epsilon"]
    refusals = [
        {"round": r, "attempts": len(reasons), "reasons": reasons}
        for r, reasons in walk.refusals.items()
    ]
    return AuditReport(
        ok=code == 0, exit_code=code, ledger=path, run=run,
        rounds=sum(row["outcome"] == "released" for row in walk.per_round),
        delta=use_delta, budget=budget, epsilon=fed, claimed_epsilon=claimed_last,
        per_client=per_client, problems=[f"forged: {f}" for f in walk.forged] + problems,
        notes=notes, per_round=walk.per_round,
        signer=None if signer is None else signer.spiffe_id,
        refused=sum(len(v) for v in walk.refusals.values()), refusals=refusals,
    )  # fmt: skip
