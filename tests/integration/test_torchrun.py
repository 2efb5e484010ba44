"""A client whose local training runs under torchrun (2 ranks, gloo on CPU): only rank 0
talks to the aggregator, both ranks train, and the run completes over the real stack."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.federation import federation, provision

pytestmark = pytest.mark.timeout(400)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_client_rank_zero_alone_talks(tmp_path: Path) -> None:
    root = provision(
        tmp_path,
        ("a", "b"),
        federation={"rounds": 2, "min_clients": 2},
        round={"local_steps": 4, "batch_size": 8, "local_lr": 0.003},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator("lm")
        log = (root / "torchrun-a.log").open("wb")
        ranks = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(_free_port()),
                "-m",
                "secure_xfl.cli",
                "client",
                "--kit",
                str(root / "client-a"),
                "--aggregator",
                f"127.0.0.1:{port}",
                "--trainer",
                "lm",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            fed.start_client("b", "--trainer", "lm")
            assert fed.wait("aggregator", timeout=300) == 0, fed.logs()
            assert ranks.wait(timeout=60) == 0, (root / "torchrun-a.log").read_text()[-3000:]
        finally:
            if ranks.poll() is None:
                ranks.kill()
    text = (root / "torchrun-a.log").read_text()
    assert text.count("joined run") == 1  # one connection: rank 0's
    assert text.count("trained on") == 2
    rounds = [json.loads(x) for x in (root / "agg-out" / "rounds.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [["a", "b"], ["a", "b"]]
    initial = json.loads((root / "agg-out" / "initial.json").read_text())["loss"]
    assert rounds[-1]["loss"] < initial
