"""Audit: exit codes for every tampering form, budgets, claims, per-client ε, CLI.

These ledgers carry no signed client statements (older key holders); the
audit of statements against a federation CA is in test_ledger_statements.py.
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
from secure_xfl.privacy.audit import AuditError, audit
from secure_xfl.privacy.ledger import PrivacyLedger, canonical_bytes

SIGMA = 1.2
DELTA = DEFAULT_DELTA
# Round r's participants out of 4 enrolled; client "d" skips rounds 1 and 3.
COHORTS = [["a", "b", "c", "d"], ["a", "b", "c"], ["a", "b", "c", "d"], ["a", "b", "c"]]


def _append(ledger: PrivacyLedger, run: str, r: int, people: list[str], **over: Any) -> None:
    q = len(people) / 4
    eps = ledger.would_spend(run, noise_multiplier=SIGMA, sample_rate=q, delta=DELTA)
    args: dict[str, Any] = {
        "run": run, "round": r, "participants": people, "enrolled": 4, "clip_norm": 1.0,
        "noise_multiplier": SIGMA, "sample_rate": q, "delta": DELTA, "rule": "fedavg",
        "epsilon": eps,
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
        _append(ledger, "run-1", 0, COHORTS[0], noise_multiplier=0.0, epsilon=None)
    report = audit(path, pub_pem)
    assert report.exit_code == 0 and report.epsilon["rdp"] == math.inf
    assert report.to_json()["epsilon"]["rdp"] == "inf"
    assert audit(path, pub_pem, budget=10.0).exit_code == 1
    json.dumps(report.to_json(), allow_nan=False)


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


def test_empty_ledger(tmp_path: Path, key: Any, pub_pem: Path) -> None:
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, key).close()
    report = audit(path, pub_pem)
    assert report.exit_code == 0 and report.rounds == 0 and report.epsilon["rdp"] == 0.0


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
    assert main([str(ledger_path), "--cert", str(pub_pem), "--no-prv"]) == 0
    captured = capsys.readouterr()
    assert "federation" in captured.out
    # No CA beside the ledger: audited anyway, with a warning that says what was not checked.
    assert "warning" in captured.err and "federation CA" in captured.err
    assert main([str(ledger_path), "--cert", str(pub_pem), "--json", "--budget", "0.5"]) == 1
    out = json.loads(capsys.readouterr().out)  # the warning goes to stderr, JSON stays clean
    assert out["exit_code"] == 1 and not out["ok"]
    assert main([str(ledger_path), "--cert", str(pub_pem), "--delta", "2"]) == 2
    assert main([str(ledger_path)]) == 2  # --cert missing
    assert main(["--bogus"]) == 2
    assert main(["--help"]) == 0
    assert "--ca" in capsys.readouterr().out
    _delete_middle(ledger_path)
    assert main([str(ledger_path), "--cert", str(pub_pem), "--json"]) == 2


def test_cli_finds_the_kits_certificate_and_ca(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    # KIT/state/ledger.jsonl: the key holder's cert.pem and ca.pem are in KIT.
    from secure_xfl.crypto import pki

    ca_cert, ca_key = pki.create_ca("fed")
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    kh_cert, kh_key = pki.issue_certificate(
        ca_cert, ca_key, pki.PeerIdentity("fed", "keyholder", "kh")
    )
    (tmp_path / "cert.pem").write_bytes(kh_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "state").mkdir()
    with PrivacyLedger(tmp_path / "state" / "ledger.jsonl", kh_key) as ledger:
        _append(ledger, "run-1", 0, COHORTS[0])
    # Found the CA, so the key holder's word on σ no longer suffices: exit 1.
    assert main([str(tmp_path / "state" / "ledger.jsonl"), "--json", "--no-prv"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["signer"] == "spiffe://fed/keyholder/kh" and "warning" not in captured.err
    assert any("no signed client statements" in p for p in out["problems"])
    # Another CA given explicitly: the signer is not the federation's key holder.
    other, _ = pki.create_ca("fed")
    (tmp_path / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    ledger_file = str(tmp_path / "state" / "ledger.jsonl")
    assert main([ledger_file, "--ca", str(tmp_path / "other.pem"), "--no-prv"]) == 2
