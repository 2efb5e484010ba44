"""Heterogeneous clouds: a slow client misses the deadline, the round closes with the
others (≥ min_clients), and its measured throughput reaches the partitioner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.training.federated_lm import DataSpec, FederatedLMTrainer
from tests.federation import federation, provision

pytestmark = pytest.mark.timeout(300)


def test_round_closes_at_the_deadline_without_the_slow_cloud(tmp_path: Path) -> None:
    root = provision(
        tmp_path,
        ("fast1", "fast2", "slow"),
        federation={"rounds": 2, "min_clients": 2},
        round={"timeout_s": 4.0, "weight_cap": 1000.0},
    )
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator("vector:300")
        fed.start_client("fast1")
        fed.start_client("fast2")
        fed.start_client("slow", "--delay", "9")
        assert fed.wait("aggregator") == 0, fed.logs()
        for c in ("fast1", "fast2", "slow"):
            assert fed.wait(f"client-{c}", timeout=90) == 0, fed.logs()
        slow_log = fed.procs["client-slow"].text()
    rounds = [json.loads(x) for x in (root / "agg-out" / "rounds.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [["fast1", "fast2"], ["fast1", "fast2"]]
    assert "upload not counted" in slow_log


def test_dynamic_partitioning_moves_data_toward_faster_clients() -> None:
    data = DataSpec(partition="dynamic", max_bytes=60_000)
    names = ["a", "b", "c"]
    trainers = {n: FederatedLMTrainer(n, data=data) for n in names}
    equal = {n: len(t._trainer({"clients": names}).all_blocks) for n, t in trainers.items()}
    assert max(equal.values()) - min(equal.values()) <= 1
    rates = {"a": 100.0, "b": 100.0, "c": 20.0}
    moved = {
        n: len(t._trainer({"clients": names, "throughputs": rates}).all_blocks)
        for n, t in trainers.items()
    }
    assert sum(moved.values()) == sum(equal.values())
    assert moved["c"] < equal["c"] < moved["a"]
    assert np.isclose(moved["c"] / moved["a"], 0.2, atol=0.05)
