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
from pathlib import Path
from typing import Any

from cryptography import x509

from secure_xfl.crypto import pki
from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.errors import PrivacyError
from secure_xfl.privacy.accountant import PRVUnavailable
from secure_xfl.privacy.audit_report import AuditReport
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


def _invalid(path: str, reason: str, budget: float | None) -> AuditReport:
    return AuditReport(
        ok=False, exit_code=2, ledger=path, run=None, rounds=0, delta=None, budget=budget,
        epsilon={"rdp": None, "prv": None}, claimed_epsilon=None, per_client={},
        problems=[reason], status="INVALID",
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
    record_budget: float | None = None,
    allow_no_dp: bool = False,
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

    ``budget`` binds the client-level figures where every decryption carried
    client-level noise, and each silo's record-level ε (PLD) unless
    ``record_budget`` names another limit for those. A run with a round
    decrypted without any noise is ``NO_PRIVACY`` (exit 1) unless
    ``allow_no_dp``; a run with no entries is ``EMPTY`` (exit 1).
    """
    _check_args(delta, budget)
    _check_args(None, record_budget)
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

    client_level = bool(mine) and not walk.record_only and not walk.no_privacy
    if walk.record_only:
        notes.append(
            f"{len(walk.record_only)} of {len(mine)} decryptions carried no client-level "
            "noise (client-level ε unbounded, not held to the budget); record-level DP-SGD "
            "protects each silo's records"
        )
    if budget is not None and client_level:
        fed_rdp = fed["rdp"]
        if fed_rdp is not None and fed_rdp > budget:
            problems.append(f"federation ε {fed_rdp:.6g} exceeds budget {budget}")
        for cid, info in per_client.items():
            if info["epsilon"]["rdp"] > budget:
                problems.append(
                    f"client {cid}: ε {info['epsilon']['rdp']:.6g} exceeds budget {budget}"
                )
    silo_budget = budget if record_budget is None else record_budget
    per_silo = _per_silo(walk, silo_budget, problems)

    status = "OK"
    if walk.no_privacy:
        rounds = ", ".join(str(r) for r in walk.no_privacy)
        msg = (f"round(s) {rounds} decrypted with NO differential privacy (no client-level "
               "noise and no record-level noise from every participant)")  # fmt: skip
        if allow_no_dp:
            notes.append(msg + "; allowed by --allow-no-dp")
        else:
            problems.append(msg + "; pass --allow-no-dp if that was intended")
            status = "NO_PRIVACY"
    if not mine:
        problems.append("nothing to audit: the ledger holds no decryption of this run")
        status = "EMPTY"
    code = 2 if walk.forged else 1 if problems else 0
    if code == 2:
        status = "INVALID"
    elif code == 1 and status == "OK":
        status = "FAIL"
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
        status=status, per_silo=per_silo, record_budget=silo_budget,
        record_rounds=walk.record_rows, client_level=client_level,
    )  # fmt: skip


def _per_silo(walk: Replay, budget: float | None, problems: list[str]) -> dict[str, dict[str, Any]]:
    """Each silo's record-level ε (PLD, RDP cross-check), held to ``budget`` (PLD)."""
    out: dict[str, dict[str, Any]] = {}
    records = walk.records
    if records is None:
        return out
    for silo in records.clients():
        pld, rdp = records.epsilon(silo, "pld"), records.epsilon(silo, "rdp")
        out[silo] = {"rounds": records.rounds(silo), "epsilon": {"pld": pld, "rdp": rdp}}
        if budget is not None and budget > 0 and pld > budget:
            problems.append(f"silo {silo}: record-level ε {pld:.6g} (PLD) exceeds budget {budget}")
        if rdp < pld * (1 - 1e-6):
            # Usually RDP is the looser bound; say so when the discretised PLD is not tighter.
            walk.notes.append(f"silo {silo}: RDP ε {rdp:.6g} is below PLD ε {pld:.6g}")
    return out
