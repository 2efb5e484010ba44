"""Masked rounds over real processes: real QUIC/mTLS, real CKKS, real X25519 masks.

The packed preset with ``privacy.masking`` (the default): every client publishes a
signed mask key once trained, the aggregator fixes and relays the cohort, every client
checks it against its own CA and masks; the key holder decrypts only whole cohorts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_xfl.privacy.audit import audit
from tests.federation import expected_models, federation, provision

NUMEL = 3000
SIGMA = 0.001

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _provision(
    tmp: Path, clients: tuple[str, ...], preset: str = "xfl-packed", **round_: object
) -> Path:
    return provision(
        tmp,
        clients,
        federation={"rounds": 1, "min_clients": 2, "preset": preset},
        privacy={"noise_multiplier": SIGMA, "clip_norm": 1.0},
        round={"timeout_s": 30.0, "weight_cap": 1000.0, "weighting": "client", **round_},
        transport={"idle_timeout_s": 15.0, "stream_timeout_s": 15.0},
    )


def _check_release(root: Path, released: tuple[str, ...], n_clients: int) -> None:
    got = np.load(root / "agg-out" / "global-1.npy", allow_pickle=False)
    want = expected_models(released, NUMEL, 1)[1]
    # DP noise std σC on the weighted sum, divided by Σ weights ≥ 0.1 per client, plus
    # quantisation error ≤ 1 % of that noise: the masks add nothing.
    total = 0.1 * n_clients
    assert np.abs(got - want).max() < 6 * SIGMA / total
    assert np.abs(want).max() > 0.01
    kh = root / "keyholder"
    report = audit(kh / "state" / "ledger.jsonl", kh / "cert.pem", ca=kh / "ca.pem")
    assert report.ok, report


@pytest.mark.parametrize("preset", ["xfl-packed", "bfv-lanes"])
@pytest.mark.parametrize("n", [3, 8])
def test_a_masked_cohort_releases_the_same_model_as_plaintext_fedavg(
    tmp_path: Path, n: int, preset: str
) -> None:
    clients = tuple(f"c{i}" for i in range(n))
    root = _provision(tmp_path, clients, preset)
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in clients:
            fed.start_client(c)
        assert fed.wait("aggregator", timeout=400) == 0, fed.logs()
        for c in clients:
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
        agg = fed.procs["aggregator"].text()
        assert f"closed with its masked cohort of {n}" in agg, agg[-3000:]
        for c in clients:
            assert f"masking for a verified cohort of {n}" in fed.procs[f"client-{c}"].text()
    _check_release(root, clients, n)


@pytest.mark.parametrize("preset", ["xfl-packed", "bfv-lanes"])
def test_a_member_killed_after_the_cohort_is_fixed_does_not_cost_the_round(
    tmp_path: Path, preset: str
) -> None:
    clients = ("alpha", "beta", "gamma")
    root = _provision(tmp_path, clients, preset, mask_timeout_s=6.0)
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        fed.start_client("alpha")
        fed.start_client("beta")
        # gamma publishes its key (the cohort is fixed with it), then dies unannounced.
        fed.start(
            "client-gamma", "client", "--kit", str(root / "client-gamma"), "--aggregator",
            f"127.0.0.1:{fed.ports['aggregator']}", "--trainer", "random",
            env={"SECURE_XFL_FAILPOINTS": "client.after_mask_key@0"},
        )  # fmt: skip
        assert fed.wait("client-gamma", timeout=120) != 0
        assert fed.wait("aggregator", timeout=300) == 0, fed.logs()
        for c in ("alpha", "beta"):
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
        agg = fed.procs["aggregator"].text()
        assert "cohort fixed (alpha, beta, gamma)" in agg
        assert "gamma did not upload" in agg and "re-masking with fresh keys" in agg
        assert "epoch 1: cohort fixed (alpha, beta)" in agg
        for c in ("alpha", "beta"):
            log = fed.procs[f"client-{c}"].text()
            assert "re-masking for epoch 1 (not retraining)" in log
            assert log.count("trained on") == 1
    _check_release(root, ("alpha", "beta"), 2)


def test_an_aggregator_kit_edited_to_drop_masks_is_refused_by_every_client(
    tmp_path: Path,
) -> None:
    clients = ("alpha", "beta")
    root = _provision(tmp_path, clients)
    cfg = root / "aggregator" / "config.toml"
    text = cfg.read_text()
    assert "masking = true" in text
    cfg.write_text(text.replace("masking = true", "masking = false"))
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in clients:
            fed.start_client(c)
        # The first client to see the plan refuses it (exit 3); with min_clients = 2 the
        # run cannot go on, so the other learns that it ended (exit 1). Nobody trains.
        rcs = [fed.wait(f"client-{c}", timeout=120) for c in clients]
        assert 3 in rcs and set(rcs) <= {1, 3}, fed.logs()
        logs = [fed.procs[f"client-{c}"].text() for c in clients]
        assert any("packed plan without pairwise masks (own kit)" in t for t in logs)
        assert not any("trained on" in t for t in logs)
        assert fed.wait("aggregator", timeout=120) != 0
    assert (
        not (root / "keyholder" / "state" / "ledger.jsonl").exists()
        or not (root / "keyholder" / "state" / "ledger.jsonl").read_text().strip()
    )
