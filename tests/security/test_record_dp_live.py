"""Record-level DP per silo against real processes: LM clients running Opacus DP-SGD.

The dishonest operator turns record-level DP off in the aggregator's own kit:
its plan proposes none, and every client still runs DP-SGD from its own kit.
One silo's kit has a smaller record budget: it trains round 0, declines round 1
with a typed reason the aggregator records, and exits 3; the others finish.
The audit recomputes each silo's ε from the ledger alone (PLD, RDP beside it),
and a key holder that re-signs its ledger after lowering a silo's signed σ_r
is caught by the client's signature (exit 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgpack
import pytest
import tomli_w
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto import pem
from secure_xfl.crypto.envelope import SignedStatement
from secure_xfl.privacy.accountant import epsilon
from secure_xfl.privacy.ledger import canonical_bytes, entry_hash, read_ledger
from secure_xfl.privacy.ledger.schema import GENESIS_PREV
from secure_xfl.services.client import EXIT_REFUSED
from secure_xfl.services.keyholder import LEDGER_FILE
from secure_xfl.training.data import default_documents, make_blocks, train_eval_split
from secure_xfl.training.lm import LMConfig
from secure_xfl.training.lm_trainer import client_share
from tests.federation import federation
from tests.security import live

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

CLI = [sys.executable, "-m", "secure_xfl.cli"]
DELTA = 1e-5
BATCH, STEPS, TARGET = 16, 3, 1.0
SILOS = live.HONEST  # alpha, beta, gamma
FRUGAL = "gamma"
FRUGAL_SIGMA = 0.8


def _edit(kit: Path, section: str, values: dict[str, Any]) -> None:
    path = kit / "config.toml"
    cfg = tomllib.loads(path.read_text())
    node = cfg
    for part in section.split("."):
        node = node.setdefault(part, {})
    node.update(values)
    path.write_text(tomli_w.dumps(cfg))


def _frugal_budget() -> float:
    """gamma's budget: one round at σ 0.8 fits, two do not."""
    train, _ = train_eval_split(make_blocks(default_documents(1_000_000), LMConfig().block_size))
    n = len(client_share(train, FRUGAL, sorted(SILOS), "fixed"))
    one = epsilon([(FRUGAL_SIGMA, BATCH / n, STEPS)], DELTA, "pld")
    two = epsilon([(FRUGAL_SIGMA, BATCH / n, 2 * STEPS)], DELTA, "pld")
    assert two > one * 1.2
    return (one + two) / 2


def _rechain(path: Path, key: Any, entries: list[dict[str, Any]]) -> None:
    """What a key holder holding its own signing key can do: rewrite and re-sign."""
    prev, lines = GENESIS_PREV, []
    for e in entries:
        body = {k: v for k, v in e.items() if k != "sig"}
        body["prev"] = prev
        body["sig"] = key.sign(canonical_bytes(body), ec.ECDSA(hashes.SHA256())).hex()
        line = canonical_bytes(body)
        lines.append(line + b"\n")
        prev = entry_hash(line)
    path.write_bytes(b"".join(lines))


def _audit(ledger: Path, kit: Path) -> tuple[int, dict[str, Any]]:
    """``secure-xfl audit LEDGER --kit KIT --json`` as a user runs it: (exit code, report)."""
    done = subprocess.run(
        [*CLI, "audit", str(ledger), "--kit", str(kit), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_each_silo_runs_its_own_record_dp_and_budget(tmp_path: Path) -> None:
    record = {"enabled": True, "target_epsilon": TARGET, "max_grad_norm": 1.0}
    root = live.provision_run(
        tmp_path, SILOS, rounds=2, min_clients=2, timeout_s=120.0,
        privacy={"allow_no_dp": False, "record": record},
        round={"batch_size": BATCH, "local_steps": STEPS, "local_lr": 3e-3, "weight_cap": 0.0},
    )  # fmt: skip
    budget = _frugal_budget()
    _edit(root / f"client-{FRUGAL}", "privacy.record",
          {"noise_multiplier": FRUGAL_SIGMA, "epsilon_budget": budget})  # fmt: skip
    # The operator's own kit: no record-level DP proposed at all.
    _edit(root / "aggregator", "privacy", {"allow_no_dp": True})
    _edit(root / "aggregator", "privacy.record", {"enabled": False})
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator("lm")
        for c in SILOS:
            fed.start_client(c, "--trainer", "lm")
        assert fed.wait("aggregator", timeout=360) == 0, fed.logs()
        rc = {c: fed.wait(f"client-{c}", timeout=60) for c in SILOS}
        logs = {name: proc.text() for name, proc in fed.procs.items()}
    assert rc == {"alpha": 0, "beta": 0, FRUGAL: EXIT_REFUSED}, rc
    assert "record_budget_exhausted" in logs[f"client-{FRUGAL}"]
    assert f"round 1: {FRUGAL} refused the plan: record_budget_exhausted" in logs["aggregator"]

    kh = root / "keyholder"
    ledger_path = kh / "state" / LEDGER_FILE
    entries = read_ledger(ledger_path, pem.load_certificate(kh / "cert.pem"))
    assert [e["participants"] for e in entries] == [sorted(SILOS), ["alpha", "beta"]]
    for e in entries:
        for item in e["statements"]:
            st = SignedStatement.from_wire(msgpack.unpackb(bytes.fromhex(item["signed"]))).statement
            # The plan proposed no record-level DP; each client ran its own kit's.
            assert st.record is not None and st.record.max_grad_norm == 1.0
            assert st.record.steps == STEPS and st.record.delta == DELTA
            if st.client == FRUGAL:
                assert st.record.noise_multiplier == FRUGAL_SIGMA
            else:
                assert st.record.noise_multiplier > 0
        assert e["noise_multiplier"] == 0.0  # no client-level noise: record-level only
    # The silo's own account: one charged round, on disk in its kit.
    state = json.loads((root / f"client-{FRUGAL}" / "state" / "record-dp.json").read_text())
    assert [x["round"] for x in state["entries"]] == [0]

    code, report = _audit(ledger_path, kh)
    assert code == 0, report
    silos = report["per_silo"]
    assert {c: s["rounds"] for c, s in silos.items()} == {"alpha": 2, "beta": 2, FRUGAL: 1}
    for c, s in silos.items():
        assert 0 < s["epsilon"]["pld"] <= s["epsilon"]["rdp"]
        assert s["epsilon"]["pld"] <= (budget if c == FRUGAL else TARGET)
    assert report["record_budget"] == TARGET  # read from the key holder's kit
    assert report["client_level"] is False

    # A key holder that raises gamma's signed σ_r (so its ε looks smaller) and re-signs
    # the whole ledger with its own key: the client's signature no longer verifies.
    first = entries[0]
    items = first["statements"]
    i = [x["client"] for x in items].index(FRUGAL)
    wire = msgpack.unpackb(bytes.fromhex(items[i]["signed"]))
    wire[0][15][3] = 5.0  # σ_r in the signed statement
    items[i] = {**items[i], "signed": msgpack.packb(wire, use_bin_type=True).hex()}
    _rechain(ledger_path, pem.load_private_key(kh / "key.pem"), entries)
    code, verdict = _audit(ledger_path, kh)
    assert code == 2, verdict
    assert verdict["status"] == "INVALID"
    assert any(FRUGAL in p and "signature" in p for p in verdict["problems"]), verdict
