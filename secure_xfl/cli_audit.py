"""``secure-xfl audit``: the command line of :func:`secure_xfl.privacy.audit.audit`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from secure_xfl.errors import SecureXFLError

__all__ = ["main"]


_EPILOG = """\
examples:
  secure-xfl audit fed/keyholder/state/ledger.jsonl --kit fed/keyholder
  secure-xfl audit demo-out/ledger.jsonl --ca demo-out/ca.pem --budget 2 --json
"""


def _audit_parser() -> argparse.ArgumentParser:
    from secure_xfl.cli_args import CliParser

    p = CliParser(
        prog="secure-xfl audit",
        epilog=_EPILOG,
        description="Verify a privacy ledger, its signer and the clients' signed statements "
        "against the federation CA, and recompute the (ε, δ) it records, refused decryptions "
        "included. Exit 0: authentic, intact and within budget; 1: budget exceeded or a claim "
        "the signatures do not support; 2: no CA given, unreadable, edited or forged.",
    )
    p.add_argument("ledger", metavar="LEDGER", help="privacy ledger (JSON Lines)")
    p.add_argument(
        "--cert", metavar="KEYHOLDER_CERT",
        help="key holder's PEM certificate (default: the --kit's cert.pem if it is the key "
        "holder's kit, else keyholder-cert.pem beside the ledger, or KIT/cert.pem when the "
        "ledger is KIT/state/ledger.jsonl)",
    )  # fmt: skip
    p.add_argument("--ca", metavar="CA_PEM", help="federation CA certificate (or use --kit)")
    p.add_argument("--crl", metavar="CRL_PEM", help="CA's CRL (default: crl.pem beside the CA)")
    p.add_argument(
        "--kit", metavar="KIT_DIR",
        help="a startup kit of the federation: its ca.pem, crl.pem, federation name and, for "
        "the key holder's kit, cert.pem",
    )  # fmt: skip
    p.add_argument("--delta", type=float, help="δ to report ε at (default: the ledger's)")
    p.add_argument(
        "--budget", type=float, metavar="EPS",
        help="fail (exit 1) when any silo's record-level ε (PLD) or, where client-level DP "
        "is on, the federation's ε exceeds this (default: the budgets in --kit's config)",
    )  # fmt: skip
    p.add_argument(
        "--allow-no-dp", action="store_true",
        help="accept rounds decrypted without any noise (otherwise status NO_PRIVACY, exit 1)",
    )  # fmt: skip
    p.add_argument("--run", help="run to audit (required if the ledger holds several)")
    p.add_argument("--expected-entries", type=int, help="entry count known out of band")
    p.add_argument("--expected-head", help="hash of the last line known out of band")
    p.add_argument("--no-prv", action="store_true", help="skip the PRV accountant")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _kit_budgets(kit: Path) -> tuple[float | None, float | None]:
    """(client-level, record-level) ε budgets of a kit's config; None where it sets none."""
    from secure_xfl.config import load_config

    p = load_config(kit / "config.toml").privacy
    fed = p.epsilon_budget if p.epsilon_budget > 0 else None
    rec = p.record.budget if p.record.enabled and p.record.budget > 0 else None
    # A kit with only a client-level budget must not silently lift the silos' limit.
    return fed, rec if rec is not None else fed


def _beside(ledger: Path, in_dir: str, in_kit: str) -> Path | None:
    """A file where secure-xfl puts it next to a ledger: beside it, or in the kit
    when the ledger is ``KIT/state/ledger.jsonl``."""
    for candidate in (ledger.parent / in_dir, ledger.parent.parent / in_kit):
        if candidate.is_file():
            return candidate
    return None


def main(argv: list[str]) -> int:
    """``secure-xfl audit``: exit code 0, 1 or 2 (see :mod:`secure_xfl.privacy.audit`)."""
    import json

    from secure_xfl.privacy.audit import AuditError, audit
    from secure_xfl.privacy.ledger import kit_trust

    parser = _audit_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad arguments (2, message on stderr)
        return exc.code if isinstance(exc.code, int) else 0
    ledger, ca, crl, cert, federation = Path(opts.ledger), opts.ca, opts.crl, opts.cert, None
    budget, record_budget = opts.budget, None
    try:
        if not ledger.exists():
            raise AuditError(f"no ledger at {ledger}: no such file")
        if opts.kit:  # the trust anchor comes from the auditor's kit, never beside the ledger
            kit = kit_trust(opts.kit)
            if budget is None:
                budget, record_budget = _kit_budgets(Path(opts.kit))
            ca, federation = ca or kit.ca, kit.federation
            crl = crl or (kit.crl if not opts.ca else None)
            cert = cert or kit.keyholder_cert
        cert = cert or _beside(ledger, "keyholder-cert.pem", "cert.pem")
        if cert is None:
            raise AuditError("no --cert given and none found beside the ledger or in --kit")
        if ca is None:
            raise AuditError(
                "no federation CA: pass --ca CA_PEM or --kit KIT_DIR; without it the audit "
                "cannot tell the key holder's ledger from one signed by anybody else"
            )
        crl = crl or Path(ca).parent / "crl.pem"
        if not Path(crl).is_file():
            raise AuditError(f"no CRL at {crl}: pass --crl CRL_PEM (the CA's revocation list)")
        report = audit(
            ledger, cert, ca=ca, crl=crl, federation=federation, delta=opts.delta,
            budget=budget, run=opts.run, expected_entries=opts.expected_entries,
            expected_head=opts.expected_head, prv=not opts.no_prv,
            record_budget=record_budget, allow_no_dp=opts.allow_no_dp,
        )  # fmt: skip
    except SecureXFLError as exc:  # AuditError, or a --kit that is not a kit
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if opts.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True, allow_nan=False))
    else:
        print(report.table())
    return report.exit_code
