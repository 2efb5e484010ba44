"""`secure-xfl demo` end to end: report, plots, falling loss, and a ledger that audits clean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

CLI = [sys.executable, "-m", "secure_xfl.cli"]


def test_demo_runs_and_its_ledger_audits_clean(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [*CLI, "demo", "--out", str(out), "--rounds", "2", "--local-steps", "15"],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]  # numbered like the logs and the ledger
    for r in rounds:
        assert set(r) >= {
            "round",
            "loss",
            "perplexity",
            "accuracy",
            "bytes_up",
            "bytes_down",
            "seconds",
            "epsilon",
        }
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert rounds[-1]["loss"] < report["initial"]["loss"] - 0.3
    for name in ("report.md", "loss.png", "privacy.png", "bytes.png", "ledger.jsonl", "ca.pem",
                 "crl.pem"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    # Record-level DP per silo by default: each silo's ε recomputed from the ledger, within
    # the demo's budget, PLD beside RDP; the non-private baseline shown next to the loss.
    privacy = report["privacy"]
    assert sorted(privacy["per_silo"]) == ["cloud-a", "cloud-b", "cloud-c"]
    for info in privacy["per_silo"].values():
        assert info["rounds"] == 2
        assert 0 < info["epsilon"]["pld"] <= privacy["budget"] == 2.0
        assert info["epsilon"]["pld"] <= info["epsilon"]["rdp"]
    assert len(privacy["per_round"]) == 2
    base = report["baseline"]
    assert [r["round"] for r in base["rounds"]] == [1, 2]
    assert all(r["baseline_loss"] is not None for r in rounds)
    assert report["loss_gap"] == pytest.approx(
        (rounds[-1]["loss"] - rounds[-1]["baseline_loss"]) / rounds[-1]["baseline_loss"]
    )
    assert "record-level ε per silo" in done.stdout
    assert report["audit"]["ok"] is True, report["audit"]["problems"]
    assert report["audit"]["signer"].startswith("spiffe://demo/keyholder/")
    # The report and the printed summary show the exact command; it audits clean.
    command = report["audit_command"]
    assert command == f"secure-xfl audit {out / 'ledger.jsonl'} --ca {out / 'ca.pem'} --budget 2"
    assert command in (out / "report.md").read_text() and command in done.stdout
    args = command.split()[2:]
    audit = subprocess.run([*CLI, "audit", *args, "--json"], capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    verdict = json.loads(audit.stdout)
    assert verdict["ok"] is True and verdict["rounds"] == 2
    # Without the CA the ledger is not called authentic.
    bare = subprocess.run(
        [*CLI, "audit", str(out / "ledger.jsonl")], capture_output=True, text=True
    )
    assert bare.returncode == 2 and "--ca CA_PEM" in bare.stderr
