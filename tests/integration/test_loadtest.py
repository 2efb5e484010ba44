"""``secure-xfl loadtest`` smoke run: 20 simulated clients × 2 rounds against the real key
holder and aggregator processes (real QUIC mTLS, CKKS, DP, signatures, ledger)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.federation import CLI

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_twenty_clients_two_rounds(tmp_path: Path) -> None:
    report_path = tmp_path / "load.json"
    done = subprocess.run(
        [*CLI, "loadtest", "--clients", "20", "--params", "20000", "--rounds", "2",
         "--workers", "2", "--json", str(report_path), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["outcome"]["outcome"] == "completed"
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["participants"] == 20  # every simulated client's upload counted
        assert r["bytes_up"] > 20 * 20_000 and r["ingest_mb_s"] > 0 and r["seconds"] > 0
        assert r["aggregator_rss_mb"] > 0 and r["keyholder_rss_mb"] > 0
    assert report["uploads_reported"] == 40 and not report["client_errors"]
    # Two worker processes carried the 20 clients, and neither imported torch.
    exits = report["worker_exits"]
    assert len(exits) == 2 and sum(e["clients"] for e in exits) == 20
    assert all(e["torch"] is False and e["failed"] == 0 for e in exits)
    assert report["workers_imported_torch"] is False
    assert report["rss_hwm_mb"]["aggregator"] > 0 and report["rss_hwm_mb"]["keyholder"] > 0
    # The key holder released each round once: one ledger line per round.
    ledger = tmp_path / "run" / "fed" / "keyholder" / "state" / "ledger.jsonl"
    assert len(ledger.read_text().splitlines()) == 2
    assert "round 2/2" in done.stdout and "| round |" in done.stdout
