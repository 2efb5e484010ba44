"""Audit: exit codes for every tampering form, budgets, claims, per-client ε,
refused decryptions, CLI.

These ledgers carry no signed client statements (older key holders) and most
are signed by a bare key, which the tests vouch for (``trust_key_only``); the
audit of statements, signer, CRL and federation against a real CA is in
test_ledger_statements.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from secure_xfl.cli import main as cli_main
from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.privacy.accountant import epsilon, epsilon_for
from secure_xfl.privacy.audit import AuditError, AuditReport
from secure_xfl.privacy.audit import audit as _audit
from secure_xfl.privacy.ledger import LedgerError, PrivacyLedger, canonical_bytes, entry_hash

SIGMA = 1.2
DELTA = DEFAULT_DELTA
# Round r's participants out of 4 enrolled; client "d" skips rounds 1 and 3.
COHORTS = [["a", "b", "c", "d"], ["a", "b", "c"], ["a", "b", "c", "d"], ["a", "b", "c"]]


def audit(path: Any, key: Any, **kw: Any) -> AuditReport:
    """The audit of a ledger signed by a bare key: the test vouches for the key."""
    return _audit(path, key, trust_key_only=True, **kw)


def _append(ledger: PrivacyLedger, run: str, r: int, people: list[str], **over: Any) -> None:
    q = len(people) / 4
    fed, worst, _ = ledger.budget(run, DELTA).projected(SIGMA, q, people)
    args: dict[str, Any] = {
        "run": run, "round": r, "participants": people, "enrolled": 4, "clip_norm": 1.0,
        "noise_multiplier": SIGMA, "sample_rate": q, "delta": DELTA, "rule": "fedavg",
        "epsilon": fed, "client_epsilon": worst,
    }  # fmt: skip
    args.update(over)
    ledger.append(**args)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def ledger_path(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "ledger.jsonl"
    with PrivacyLedger(path, key) as ledger:
        for r, people in enumerate(COHORTS):
            _append(ledger, "run-1", r, people)
    return path


@pytest.fixture
def pub_pem(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "keyholder.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _history() -> list[tuple[float, float, int]]:
    return [(SIGMA, len(c) / 4, 1) for c in COHORTS]


def test_intact_ledger_known_answer(ledger_path: Path, pub_pem: Path) -> None:
    report = audit(ledger_path, pub_pem)
    assert report.exit_code == 0 and report.ok and report.problems == []
    assert report.run == "run-1" and report.rounds == 4 and report.delta == DELTA
    assert report.epsilon["rdp"] == pytest.approx(epsilon(_history(), DELTA, "rdp"))
    assert report.epsilon["prv"] == pytest.approx(epsilon(_history(), DELTA, "prv"))
    assert report.claimed_epsilon == pytest.approx(report.epsilon["rdp"])
    # Clients a, b, c were in every round at sample rate 1.
    assert report.per_client["a"]["rounds"] == 4
    assert report.per_client["a"]["epsilon"]["rdp"] == pytest.approx(
        epsilon_for(SIGMA, 1.0, 4, DELTA)
    )


def test_client_that_skipped_rounds_has_lower_epsilon(ledger_path: Path, pub_pem: Path) -> None:
    report = audit(ledger_path, pub_pem)
    d = report.per_client["d"]
    assert d["rounds"] == 2
    assert d["epsilon"]["rdp"] == pytest.approx(epsilon_for(SIGMA, 1.0, 2, DELTA))
    assert d["epsilon"]["rdp"] < report.epsilon["rdp"]
    assert d["epsilon"]["prv"] < report.epsilon["prv"]
    assert d["epsilon"]["rdp"] < report.per_client["a"]["epsilon"]["rdp"]


def test_other_delta(ledger_path: Path, pub_pem: Path) -> None:
    report = audit(ledger_path, pub_pem, delta=1e-8, prv=False)
    assert report.exit_code == 0 and report.delta == 1e-8
    assert report.epsilon["rdp"] == pytest.approx(epsilon(_history(), 1e-8))
    assert report.epsilon["prv"] is None


def test_budget(ledger_path: Path, pub_pem: Path) -> None:
    fed = audit(ledger_path, pub_pem, prv=False).epsilon["rdp"]
    assert fed is not None
    assert audit(ledger_path, pub_pem, budget=100.0, prv=False).exit_code == 0
    over = audit(ledger_path, pub_pem, budget=fed * 0.9, prv=False)
    assert over.exit_code == 1 and not over.ok
    assert any("exceeds budget" in p for p in over.problems)


def test_per_client_epsilon_is_held_to_the_budget(ledger_path: Path, pub_pem: Path) -> None:
    report = audit(ledger_path, pub_pem, prv=False)
    fed, a = report.epsilon["rdp"], report.per_client["a"]["epsilon"]["rdp"]
    assert fed is not None and a > fed  # no amplification once participation is known
    between = audit(ledger_path, pub_pem, budget=(fed + a) / 2, prv=False)
    assert between.exit_code == 1
    assert all(p.startswith("client") for p in between.problems)


def test_understated_claim(tmp_path: Path, key: Any, pub_pem: Path) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
        _append(ledger, "run-1", 1, COHORTS[1], epsilon=0.5)
        _append(ledger, "run-1", 2, COHORTS[2])
    report = audit(path, pub_pem, prv=False)
    assert report.exit_code == 1
    assert any("round 1" in p and "understates" in p for p in report.problems)


def test_unbounded_round(tmp_path: Path, key: Any, pub_pem: Path) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(
            ledger, "run-1", 0, COHORTS[0], noise_multiplier=0.0, epsilon=None,
            client_epsilon=math.inf,
        )  # fmt: skip
    # A round decrypted without any noise is its own status, not "OK".
    bare = audit(path, pub_pem)
    assert bare.exit_code == 1 and bare.status == "NO_PRIVACY"
    assert "NO_PRIVACY" in bare.table() and "--allow-no-dp" in " ".join(bare.problems)
    report = audit(path, pub_pem, allow_no_dp=True)
    assert report.exit_code == 0 and report.status == "OK"
    assert report.epsilon["rdp"] == math.inf
    assert report.to_json()["epsilon"]["rdp"] == "inf"
    json.dumps(report.to_json(), allow_nan=False)


def test_empty_ledger_is_not_ok(tmp_path: Path, key: Any, pub_pem: Path) -> None:
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, key).close()
    report = audit(path, pub_pem)
    assert report.exit_code == 1 and report.status == "EMPTY"
    assert report.rounds == 0 and report.epsilon["rdp"] == 0.0
    assert "nothing to audit" in " ".join(report.problems)


def test_several_runs(tmp_path: Path, key: Any, pub_pem: Path) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
        _append(ledger, "run-2", 0, COHORTS[1])
        _append(ledger, "run-1", 1, COHORTS[0])
    with pytest.raises(AuditError):
        audit(path, pub_pem)
    one = audit(path, pub_pem, run="run-1", prv=False)
    assert one.exit_code == 0 and one.rounds == 2
    assert audit(path, pub_pem, run="nope", prv=False).exit_code == 1


# ----------------------------------------------------------------- tampering → 2


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _edit_field(path: Path) -> None:
    lines = _lines(path)
    obj = json.loads(lines[1])
    obj["noise_multiplier"] = 5.0
    lines[1] = canonical_bytes(obj) + b"\n"
    path.write_bytes(b"".join(lines))


def _edit_bytes(path: Path) -> None:
    path.write_bytes(
        path.read_bytes().replace(b'"noise_multiplier":1.2', b'"noise_multiplier":9.2', 1)
    )


def _reorder(path: Path) -> None:
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))


def _delete_middle(path: Path) -> None:
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))


def _forge(path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    lines = _lines(path)
    obj = json.loads(lines[3])
    del obj["sig"]
    obj["epsilon"] = 0.1
    obj["sig"] = other.sign(canonical_bytes(obj), ec.ECDSA(hashes.SHA256())).hex()
    lines[3] = canonical_bytes(obj) + b"\n"
    path.write_bytes(b"".join(lines))


def _flip_sig(path: Path) -> None:
    lines = _lines(path)
    obj = json.loads(lines[2])
    sig = bytearray(bytes.fromhex(obj["sig"]))
    sig[-1] ^= 0x01
    obj["sig"] = sig.hex()
    lines[2] = canonical_bytes(obj) + b"\n"
    path.write_bytes(b"".join(lines))


def _append_garbage(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b'{"hello": "world"}\n')


def _not_json(path: Path) -> None:
    path.write_bytes(b"this is not a ledger\n")


def _huge(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(1024 * 1024 * 1024 + 1)  # sparse: costs no disk


def _truncate_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize(
    "tamper",
    [_edit_field, _edit_bytes, _reorder, _delete_middle, _forge, _flip_sig, _append_garbage,
     _not_json, _huge, _truncate_bytes],
)  # fmt: skip
def test_tampering_gives_exit_code_2(ledger_path: Path, pub_pem: Path, tamper: Any) -> None:
    tamper(ledger_path)
    report = audit(ledger_path, pub_pem)
    assert report.exit_code == 2 and not report.ok
    assert report.problems and report.problems[0].startswith("ledger invalid")
    assert "INVALID" in report.table()


def test_signed_by_another_key_entirely(ledger_path: Path) -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    assert audit(ledger_path, other).exit_code == 2


def test_missing_ledger_and_bad_cert(tmp_path: Path, ledger_path: Path, pub_pem: Path) -> None:
    assert audit(tmp_path / "missing.jsonl", pub_pem).exit_code == 2
    assert audit(ledger_path, tmp_path / "missing.pem").exit_code == 2


def test_truncated_tail_caught_with_anchor(ledger_path: Path, pub_pem: Path, key: Any) -> None:
    with PrivacyLedger(ledger_path, key) as ledger:
        head, count = ledger.head, len(ledger)
    ledger_path.write_bytes(b"".join(_lines(ledger_path)[:-1]))
    assert audit(ledger_path, pub_pem, prv=False).exit_code == 0  # chain alone cannot tell
    assert audit(ledger_path, pub_pem, expected_entries=count).exit_code == 2
    assert audit(ledger_path, pub_pem, expected_head=head).exit_code == 2


# ---------------------------------------------------------------------- output


def test_to_json_and_table(ledger_path: Path, pub_pem: Path) -> None:
    report = audit(ledger_path, pub_pem, budget=50.0)
    data = report.to_json()
    assert {"ok", "epsilon", "claimed_epsilon", "per_client", "problems"} <= set(data)
    assert set(data["epsilon"]) == {"rdp", "prv"}
    assert set(data["per_client"]) == {"a", "b", "c", "d"}
    assert data["per_client"]["d"]["rounds"] == 2
    json.dumps(data, allow_nan=False)
    table = report.table()
    assert "federation" in table and "status: OK" in table and "d " in table


def main(argv: list[str]) -> int:
    return cli_main(["audit", *argv])


def test_cli(ledger_path: Path, pub_pem: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without a CA the audit refuses to call the ledger authentic, and says how to pass one.
    assert main([str(ledger_path), "--cert", str(pub_pem), "--no-prv"]) == 2
    err = capsys.readouterr().err
    assert "--ca CA_PEM" in err and "--kit KIT_DIR" in err
    assert main([str(ledger_path)]) == 2  # --cert missing
    assert main(["--bogus"]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--ca" in out and "--kit" in out and "--crl" in out
    assert main([str(ledger_path), "--kit", str(ledger_path.parent)]) == 2  # not a kit
    assert "not a startup kit" in capsys.readouterr().err


def _kit(root: Path, role: str, federation: str = "fed") -> Path:
    """The trust part of a startup kit: config.toml (federation, role), ca.pem, crl.pem."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(
        f'[federation]\nname = "{federation}"\n\n[party]\nrole = "{role}"\nname = "{role}"\n'
    )
    return root


def test_cli_finds_the_kits_certificate_and_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from secure_xfl.crypto import pem, pki

    kit = _kit(tmp_path / "keyholder", "keyholder")
    ca_cert, ca_key = pki.create_ca("fed")
    pem.write_certificate(kit / "ca.pem", ca_cert)
    pem.write_crl(kit / "crl.pem", pki.build_crl(ca_cert, ca_key, []))
    kh_cert, kh_key = pki.issue_certificate(
        ca_cert, ca_key, pki.PeerIdentity("fed", "keyholder", "kh")
    )
    pem.write_certificate(kit / "cert.pem", kh_cert)
    (kit / "state").mkdir()
    ledger_file = str(kit / "state" / "ledger.jsonl")
    with PrivacyLedger(ledger_file, kh_key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
    # KIT/state/ledger.jsonl: the cert is found in KIT, but the CA is never taken
    # from beside the ledger (whoever ships a ledger could ship a CA with it).
    assert main([ledger_file, "--no-prv"]) == 2
    assert "--ca CA_PEM" in capsys.readouterr().err
    # --kit: ca.pem, crl.pem and (the key holder's kit) cert.pem; the CA is checked,
    # so the key holder's word on σ no longer suffices: exit 1.
    assert main([ledger_file, "--kit", str(kit), "--json", "--no-prv"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["signer"] == "spiffe://fed/keyholder/kh"
    assert any("no signed client statements" in p for p in out["problems"])
    # Another CA given explicitly: the signer is not the federation's key holder.
    other, other_key = pki.create_ca("fed")
    pem.write_certificate(tmp_path / "other.pem", other)
    pem.write_crl(tmp_path / "crl.pem", pki.build_crl(other, other_key, []))
    assert main([ledger_file, "--ca", str(tmp_path / "other.pem"), "--no-prv"]) == 2
    assert "untrusted" in capsys.readouterr().out


# ------------------------------------------------------------ refused decryptions


def _history_of(cohorts: list[list[str]]) -> list[tuple[float, float, int]]:
    return [(SIGMA, len(c) / 4, 1) for c in cohorts]


def test_refused_decryptions_are_charged_and_listed(
    tmp_path: Path, key: Any, pub_pem: Path
) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0], outcome="refused", reason="aggregate_out_of_bounds")
        _append(ledger, "run-1", 0, COHORTS[1], outcome="refused", reason="lane_integrity")
        _append(ledger, "run-1", 0, COHORTS[2])
        _append(ledger, "run-1", 1, COHORTS[3])
    report = audit(path, pub_pem)
    assert report.exit_code == 0, report.problems
    assert report.rounds == 2 and report.refused == 2
    assert report.refusals == [
        {"round": 0, "attempts": 2, "reasons": ["aggregate_out_of_bounds", "lane_integrity"]}
    ]
    charged = [COHORTS[0], COHORTS[1], COHORTS[2], COHORTS[3]]
    assert report.epsilon["rdp"] == pytest.approx(epsilon(_history_of(charged), DELTA, "rdp"))
    assert report.per_client["a"]["rounds"] == 4 and report.per_client["d"]["rounds"] == 2
    assert [r["outcome"] for r in report.per_round] == [
        "refused",
        "refused",
        "released",
        "released",
    ]
    assert report.per_round[0]["reason"] == "aggregate_out_of_bounds"
    assert report.per_round[2]["reason"] is None
    table = report.table()
    assert "refused decryptions (charged): 2" in table and "lane_integrity" in table
    data = report.to_json()
    assert data["refused"] == 2 and data["refusals"][0]["attempts"] == 2
    json.dumps(data, allow_nan=False)


def _append_raw(path: Path, key: Any, **fields: Any) -> None:
    """Sign and chain an entry the writer would refuse: what a buggy or hostile key
    holder holding the real key could write."""
    lines = _lines(path)
    last = json.loads(lines[-1])
    obj = {k: v for k, v in last.items() if k not in ("sig", "reason")}
    obj.update(fields, seq=len(lines), prev=entry_hash(lines[-1].rstrip(b"\n")))
    data = canonical_bytes(obj)
    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    obj["sig"] = sig.hex()
    with open(path, "ab") as fh:
        fh.write(canonical_bytes(obj) + b"\n")


def test_refused_after_release_and_second_release_are_flagged(
    tmp_path: Path, key: Any, pub_pem: Path
) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
        with pytest.raises(LedgerError, match="refused after its release"):
            _append(ledger, "run-1", 0, COHORTS[0], outcome="refused", reason="late")
        with pytest.raises(LedgerError, match="released again"):
            _append(ledger, "run-1", 0, COHORTS[0])
    _append_raw(path, key, outcome="refused", reason="late", epsilon=None)
    report = audit(path, pub_pem, prv=False)
    assert report.exit_code == 1 and report.refused == 1
    assert any("round 0: a refused decryption is recorded after" in p for p in report.problems)
    _append_raw(path, key, outcome="released", epsilon=None)
    again = audit(path, pub_pem, prv=False)
    assert again.exit_code == 1 and again.rounds == 2
    assert "round 0 was released more than once" in again.problems
    # The writer opens such a file (it is signed) but still refuses to add to the round.
    with PrivacyLedger(path, key) as ledger:
        assert ledger.released("run-1", 0) and ledger.attempts("run-1", 0) == 1
        with pytest.raises(LedgerError):
            _append(ledger, "run-1", 0, COHORTS[0], outcome="refused", reason="late")


def test_understated_client_epsilon(tmp_path: Path, key: Any, pub_pem: Path) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
        # The federation claim is honest, the largest client's is not (a, b, c are at
        # rate 1 and pay more than the subsampled federation figure).
        fed = ledger.would_spend("run-1", noise_multiplier=SIGMA, sample_rate=0.75, delta=DELTA)
        _append(ledger, "run-1", 1, COHORTS[1], client_epsilon=fed)
    report = audit(path, pub_pem, prv=False)
    assert report.exit_code == 1
    (msg,) = report.problems
    assert msg.startswith("round 1: claimed client ε") and "understates" in msg
    row = report.per_round[1]
    assert row["claimed_client_epsilon"] == pytest.approx(fed)
    assert row["client_epsilon"] == pytest.approx(epsilon_for(SIGMA, 1.0, 2, DELTA))
    # An unbounded claim never understates; an honest one passes.
    path2 = tmp_path / "l2.jsonl"
    with PrivacyLedger(path2, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0], client_epsilon=math.inf)
        _append(ledger, "run-1", 1, COHORTS[1])
    honest = audit(path2, pub_pem, prv=False)
    assert honest.exit_code == 0, honest.problems
    assert honest.per_round[0]["claimed_client_epsilon"] == math.inf
    assert honest.per_round[1]["claimed_client_epsilon"] == pytest.approx(
        honest.per_round[1]["client_epsilon"], rel=1e-9
    )


def test_refused_decryptions_count_against_the_budget(
    tmp_path: Path, key: Any, pub_pem: Path
) -> None:
    path = tmp_path / "l.jsonl"
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
    one = audit(path, pub_pem, prv=False)
    with PrivacyLedger(path, key) as ledger:
        _append(ledger, "run-1", 1, COHORTS[0], outcome="refused", reason="aggregate_out_of_bounds")
    two = audit(path, pub_pem, prv=False)
    assert two.rounds == 1 and two.refused == 1
    a1, a2 = one.per_client["a"]["epsilon"]["rdp"], two.per_client["a"]["epsilon"]["rdp"]
    assert a2 == pytest.approx(epsilon_for(SIGMA, 1.0, 2, DELTA)) and a2 > a1
    # A budget the one release fits but the refused decryption on top breaks.
    assert audit(path, pub_pem, prv=False, budget=(a1 + a2) / 2).exit_code == 1
    assert one.epsilon["rdp"] is not None and two.epsilon["rdp"] is not None
    assert two.epsilon["rdp"] > one.epsilon["rdp"]
