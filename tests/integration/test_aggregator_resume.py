"""The aggregator dies while round 1 collects and is restarted with the same command:
the run completes all its rounds, each released exactly once (real processes).

Three random-trainer clients (deterministic updates, so the expected global model is
known exactly); gamma trains for 4 s a round, so round 1 is still collecting when the
aggregator is killed (SIGKILL) or stopped (SIGTERM: checkpoint, exit 0). The clients
ride out the restart (``transport.connect_deadline_s``), whether they re-send their
cached upload or retrain: either way the re-opened round's sum must be exactly the
three updates once, the key holder's ledger must hold one released line per round,
and ``rounds.jsonl`` must list each round once.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.crypto.context import get_preset
from tests.federation import Federation, expected_models, federation, provision

CLIENTS = ("alpha", "beta", "gamma")
NUMEL = 1000
ROUNDS = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _wait_for(fed: Federation, name: str, pattern: str, timeout: float = 120) -> None:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while not rx.search(fed.procs[name].text()):
        if time.monotonic() > deadline or fed.procs[name].popen.poll() is not None:
            raise AssertionError(f"{name} never logged {pattern!r}\n{fed.logs()}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_aggregator_restart_while_collecting_completes_the_run(
    tmp_path: Path, sig: signal.Signals
) -> None:
    root = provision(
        tmp_path,
        CLIENTS,
        federation={"rounds": ROUNDS, "min_clients": 3},
        round={"timeout_s": 60.0, "weight_cap": 1000.0},
        transport={"connect_deadline_s": 120.0, "idle_timeout_s": 15.0, "stream_timeout_s": 15.0},
    )
    out = root / "agg-out"
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        fed.start_client("alpha")
        fed.start_client("beta")
        fed.start_client("gamma", "--delay", "4")
        agg = fed.procs["aggregator"]
        _wait_for(fed, "aggregator", r"round 1: update from \w+ accepted \(1/3\)")
        assert not re.search(r"round 1 closed", agg.text()), "round 1 closed too early"
        agg.popen.send_signal(sig)
        rc = fed.wait("aggregator", timeout=60)
        if sig == signal.SIGTERM:
            assert rc == 0, f"SIGTERM must checkpoint and exit 0, got {rc}\n{fed.logs()}"
            assert "checkpointed at round 1; restart with the same command" in agg.text()
        else:
            assert rc == -signal.SIGKILL
        assert (out / "checkpoint" / "state.npz").is_file()
        assert not (out / "checkpoint" / "pending.bin").exists()  # round 1 was not closed
        assert (out / "rounds.jsonl").read_text().count("\n") == 1  # round 0 only

        fed.restart("aggregator")
        assert fed.wait("aggregator", timeout=300) == 0, fed.logs()
        for c in CLIENTS:
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
        log = agg.text().split("=== restarted aggregator ===")[1]
        assert "resumed run" in log and "at round 1 (attempt 0)" in log, log

    rounds = [json.loads(x)["round"] for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS)), rounds
    outcome = json.loads((out / "outcome.json").read_text())
    assert outcome["ok"] is True and outcome["rounds"] == ROUNDS, outcome
    ledger = (root / "keyholder" / "state" / "ledger.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in ledger]
    assert [(e["round"], e.get("outcome", "released")) for e in entries] == [
        (r, "released") for r in range(ROUNDS)
    ], entries
    # Every update counted exactly once in every round (none lost, none twice).
    preset = get_preset("xfl-default")
    expected = expected_models(CLIENTS, NUMEL, ROUNDS)
    for r in range(ROUNDS + 1):
        got = np.load(out / f"global-{r}.npy", allow_pickle=False)
        bound = r * preset.error_bound(0.06, len(CLIENTS), 3 * 100 / 1000)
        assert np.abs(got - expected[r]).max() <= bound, f"round {r}"
