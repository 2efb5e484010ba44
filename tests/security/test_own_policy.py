"""Each party enforces its own policy (DESIGN §2), against real processes over mTLS QUIC.

The dishonest operator edits only the aggregator's own ``config.toml`` (σ = 0,
then C = 100, then min_clients = 1). The aggregator's plan is only a proposal:
no client trains on it, nothing is released, and each process says why. A
client whose own kit is weaker than the key holder's can get no aggregate
released that contains a weaker entry. An honest run's ledger σ is exactly the
σ the clients signed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgpack
import pytest
import tomli_w

from secure_xfl.crypto import pem
from secure_xfl.crypto.dpspec import effective_noise
from secure_xfl.crypto.envelope import SignedStatement
from secure_xfl.kit import Kit
from secure_xfl.privacy.ledger import read_ledger
from secure_xfl.protocol import messages
from secure_xfl.services.client import EXIT_REFUSED
from secure_xfl.services.keyholder import LEDGER_FILE
from tests.federation import federation, run_to_completion
from tests.security import live

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SIGMA, CLIP, K = 1.0, 1.0, 3
NUMEL = 2000


def _provision(tmp: Path, rounds: int = 1) -> Path:
    return live.provision_run(
        tmp,
        live.HONEST,
        rounds=rounds,
        min_clients=K,
        timeout_s=60.0,
        privacy={"noise_multiplier": SIGMA, "clip_norm": CLIP},
    )


def _edit_kit(kit: Path, section: str, **values: Any) -> None:
    """What an operator does: edit its own kit's config.toml, nothing else."""
    path = kit / "config.toml"
    cfg = tomllib.loads(path.read_text())
    cfg.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


def _ledger(root: Path) -> list[dict[str, Any]]:
    kh = root / "keyholder"
    path = kh / "state" / LEDGER_FILE
    if not path.exists():
        return []
    return read_ledger(path, pem.load_certificate(kh / "cert.pem"))


@pytest.mark.parametrize(
    ("section", "values", "why"),
    [
        ("privacy", {"noise_multiplier": 0.0}, "noise_multiplier 0 < 1"),
        ("privacy", {"clip_norm": 100.0}, "clip_norm 100 > 1"),
        ("federation", {"min_clients": 1}, "min_clients 1 < 3"),
    ],
    ids=["sigma0", "clip100", "min-clients1"],
)
def test_an_operator_weakening_its_own_kit_changes_nothing_clients_apply(
    tmp_path: Path, section: str, values: dict[str, Any], why: str
) -> None:
    root = _provision(tmp_path)
    _edit_kit(root / "aggregator", section, **values)
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in live.HONEST:
            fed.start_client(c)
        agg_rc = fed.wait("aggregator", timeout=120)
        client_rc = {c: fed.wait(f"client-{c}", timeout=60) for c in live.HONEST}
        logs = {name: proc.text() for name, proc in fed.procs.items()}
    assert agg_rc == 1, logs["aggregator"]
    assert "refused the plan of round 0" in logs["aggregator"]
    assert why in logs["aggregator"]
    # One refusal already leaves fewer than min_clients: the run ends, and a client that
    # had not been offered the plan yet hears why in the aggregator's final "done".
    assert EXIT_REFUSED in client_rc.values(), client_rc
    for c in live.HONEST:
        text = logs[f"client-{c}"]
        assert why in text, text
        if client_rc[c] == EXIT_REFUSED:
            assert "refusing round 0" in text and "(own kit)" in text
        else:
            assert client_rc[c] == 1 and "run finished: clients refused the plan" in text
        assert "trained on" not in text and "MB (staleness" not in text
    assert _ledger(root) == []  # nothing released, nothing charged
    assert not (root / "keyholder" / "state" / "decrypted.jsonl").exists()
    assert not (root / "agg-out" / "global-1.npy").exists()


def test_a_client_with_a_weaker_kit_gets_no_weaker_entry_released(tmp_path: Path) -> None:
    """gamma's kit asks for σ = 0.3 only. Its honest process still applies the plan's
    σ = 1 (a plan may only be stricter) and the run completes; an update signed with
    gamma's own σ = 0.3 (what a client following only its own weaker kit would send)
    makes the real key holder refuse any aggregate containing it, naming the reason."""
    root = _provision(tmp_path, rounds=1)
    _edit_kit(root / "client-gamma", "privacy", noise_multiplier=0.3)
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in live.HONEST:
            fed.start_client(c)
        assert fed.wait("aggregator", timeout=150) == 0, fed.logs()
        (entry,) = _ledger(root)
        signed = {
            s["client"]: SignedStatement.from_wire(msgpack.unpackb(bytes.fromhex(s["signed"])))
            for s in entry["statements"]
        }
        assert {c: st.statement.dp.noise_multiplier for c, st in signed.items()} == {  # type: ignore[union-attr]
            c: SIGMA for c in live.HONEST
        }
        # Now the weaker entry, for round 1 (round 0 is released and closed).
        model = live.zero_model(NUMEL)
        kits = {c: Kit.load(root / f"client-{c}") for c in live.HONEST}
        plan = live.aggregator_plan(kits["alpha"], 1, model)
        ups = [
            live.protect_as(kits[c], live.update_vector(c, 1, model), model, 1, plan=plan)
            for c in live.HONEST
        ]
        assert ups[2].statement.dp is not None and ups[2].statement.dp.noise_multiplier == 0.3
        agg = live.accumulate(root, ups, 1, NUMEL)
        out = live.run(
            live.call_once(
                Kit.load(root / "aggregator"),
                "keyholder",
                fed.ports["keyholder"],
                messages.encode("decrypt", aggregate=agg.encode()),
            )
        )
        kh_log = fed.procs["keyholder"].text()
    assert out.code == "decryption_refused", out
    assert "dp_weaker_than_policy" in out.message and "gamma" in out.message
    assert "dp_weaker_than_policy" in kh_log
    assert len(_ledger(root)) == 1  # the refused aggregate was not charged


def test_the_honest_ledger_sigma_is_the_sigma_clients_signed(tmp_path: Path) -> None:
    root = _provision(tmp_path, rounds=2)
    run_to_completion(root, live.HONEST, f"vector:{NUMEL}")
    entries = _ledger(root)
    assert [e["round"] for e in entries] == [0, 1]
    for e in entries:
        statements = [
            SignedStatement.from_wire(msgpack.unpackb(bytes.fromhex(s["signed"])))
            for s in e["statements"]
        ]
        specs = [st.statement.dp for st in statements]
        assert all(d is not None and d.noise_multiplier == SIGMA for d in specs)
        assert {st.statement.round for st in statements} == {e["round"]}
        sigma, sens = effective_noise([d for d in specs if d is not None], [1.0] * len(specs))
        assert e["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
        assert e["clip_norm"] == pytest.approx(sens) == CLIP
