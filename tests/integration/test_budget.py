"""A DP run driven into its ε budget stops cleanly; the ledger audits clean within budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_xfl.privacy.audit import audit
from tests.federation import provision, run_to_completion

CLIENTS = ("alpha", "beta", "gamma")

pytestmark = pytest.mark.timeout(300)


def test_run_stops_at_the_privacy_budget(tmp_path: Path) -> None:
    # σ = 1 with all 3 of min_clients=3 participating: ε(RDP, δ=1e-5) is 4.73 after
    # one round, 7.08 after two, 9.01 after three — a budget of 8 allows exactly two.
    root = provision(
        tmp_path,
        CLIENTS,
        federation={"rounds": 5, "min_clients": 3},
        privacy={"noise_multiplier": 1.0, "clip_norm": 1.0, "epsilon_budget": 8.0},
        round={"timeout_s": 60.0, "weight_cap": 1000.0, "weighting": "client"},
    )
    fed = run_to_completion(root, CLIENTS, "vector:500")
    agg_log = fed.procs["aggregator"].text()

    outcome = json.loads((root / "agg-out" / "outcome.json").read_text())
    assert outcome["budget_exhausted"] is True and outcome["rounds"] == 2
    assert "privacy budget reached" in agg_log
    assert (root / "agg-out" / "rounds.jsonl").read_text().count("\n") == 2

    ledger = root / "keyholder" / "state" / "ledger.jsonl"
    report = audit(
        ledger, root / "keyholder" / "cert.pem", ca=root / "keyholder" / "ca.pem", budget=8.0
    )
    assert report.exit_code == 0, report.table()
    assert report.rounds == 2
    assert 7.0 < report.epsilon["rdp"] < 7.2
    over = audit(
        ledger, root / "keyholder" / "cert.pem", ca=root / "keyholder" / "ca.pem", budget=5.0
    )
    assert over.exit_code == 1
