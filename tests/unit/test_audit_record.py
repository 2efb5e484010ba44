"""The audit's record-level figures: each silo's ε from its signed DP-SGD specs alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from secure_xfl.cli import main as cli_main
from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.privacy.accountant import epsilon
from secure_xfl.privacy.audit import audit
from secure_xfl.privacy.ledger import PrivacyLedger
from tests.unit.test_ledger_statements import (
    CLIENTS,
    Federation,
    append,
    fed,  # noqa: F401  (fixture)
    item,
    pki_material,  # noqa: F401  (fixture)
    statement,
)

REC = RecordDPSpec(max_grad_norm=1.0, noise_multiplier=0.9, sample_rate=0.0137, steps=20,
                   delta=DEFAULT_DELTA)  # fmt: skip


def _write(
    fed: Federation,  # noqa: F811
    rounds: int,
    *,
    claim: float = 1.0,
    name: str = "ledger.jsonl",
    **over: Any,
) -> Path:
    """Record-only rounds (no client-level noise): each client signs REC."""
    path = fed.dir / name
    with PrivacyLedger(path, fed.keyholder.key) as ledger:
        for r in range(rounds):
            sts = [dataclasses.replace(statement(n, r, dp=None), record=REC) for n in CLIENTS]
            items = [item(s, fed.clients[s.client]) for s in sts]
            eps = epsilon([REC.history] * (r + 1), DEFAULT_DELTA, "pld")
            append(ledger, r, items, sigma=0.0, sensitivity=1.0, epsilon=None,
                   record_epsilon={c: eps * claim for c in CLIENTS}, **over)  # fmt: skip
    return path


def test_each_silo_is_recomputed_with_pld_and_rdp(fed: Federation) -> None:  # noqa: F811
    path = _write(fed, 3)
    report = audit(path, fed.kh_path, ca=fed.ca_path, budget=2.0)
    assert report.exit_code == 0 and report.status == "OK", report.table()
    expected = epsilon([REC.history] * 3, DEFAULT_DELTA, "pld")
    for silo in CLIENTS:
        info = report.per_silo[silo]
        assert info["rounds"] == 3
        assert info["epsilon"]["pld"] == pytest.approx(expected)
        assert info["epsilon"]["rdp"] == pytest.approx(
            epsilon([REC.history] * 3, DEFAULT_DELTA, "rdp")
        )
    assert not report.client_level  # σ_eff 0: client-level ε unbounded, not budgeted
    assert "record-level DP per silo" in report.table()
    assert len(report.record_rounds) == 3
    assert sorted(report.record_rounds[0]) == ["alpha", "beta", "gamma", "round"]


def test_a_silo_over_budget_or_an_understated_claim_exits_1(fed: Federation) -> None:  # noqa: F811
    path = _write(fed, 3)
    spent = epsilon([REC.history] * 3, DEFAULT_DELTA, "pld")
    over = audit(path, fed.kh_path, ca=fed.ca_path, budget=spent * 0.99)
    assert over.exit_code == 1 and over.status == "FAIL"
    assert any("record-level ε" in p and "exceeds budget" in p for p in over.problems)
    # record_budget names the silos' limit separately from the client-level one.
    assert audit(path, fed.kh_path, ca=fed.ca_path, budget=0.1, record_budget=2.0).exit_code == 0
    low = _write(fed, 2, claim=0.5, name="low.jsonl")
    under = audit(low, fed.kh_path, ca=fed.ca_path)
    assert under.exit_code == 1
    assert any("understates" in p and "record ε" in p for p in under.problems)


def test_cli_reads_the_record_budget_from_the_kit(fed: Federation, tmp_path: Path) -> None:  # noqa: F811
    path = _write(fed, 3)
    spent = epsilon([REC.history] * 3, DEFAULT_DELTA, "pld")
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "ca.pem").write_text(fed.ca_path.read_text())
    (kit / "crl.pem").write_bytes(fed.crl_path.read_bytes())
    (kit / "cert.pem").write_text(fed.kh_path.read_text())
    for budget, code in ((spent * 1.01, 0), (spent * 0.99, 1)):
        (kit / "config.toml").write_text(
            f'[party]\nrole = "keyholder"\nname = "keyholder"\n[federation]\nname = "fed"\n'
            f"[privacy.record]\ntarget_epsilon = {budget}\n"
        )
        assert cli_main(["audit", str(path), "--kit", str(kit)]) == code
