"""Two rounds over real processes, real QUIC/mTLS, real CKKS: the aggregates are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_xfl.crypto.context import get_preset, load_context
from secure_xfl.errors import SecureXFLError
from tests.federation import expected_models, provision, run_to_completion

CLIENTS = ("alpha", "beta", "gamma")
NUMEL = 3000

pytestmark = pytest.mark.timeout(300)


def test_two_rounds_over_real_processes(tmp_path: Path) -> None:
    root = provision(
        tmp_path,
        CLIENTS,
        federation={"rounds": 2, "min_clients": 3},
        round={"timeout_s": 60.0, "weight_cap": 1000.0},
    )
    fed = run_to_completion(root, CLIENTS, f"vector:{NUMEL}")
    # These kits run without any DP (allow_no_dp): every service says so, every round.
    logs = {name: proc.text() for name, proc in fed.procs.items()}
    assert logs["aggregator"].count("proposes NO differential privacy") == 2
    assert logs["keyholder"].count("with NO differential privacy") == 2
    assert all(logs[f"client-{c}"].count("NO differential privacy") == 2 for c in CLIENTS)

    out = root / "agg-out"
    expected = expected_models(CLIENTS, NUMEL, 2)
    preset = get_preset("xfl-default")
    for r in range(3):
        got = np.load(out / f"global-{r}.npy", allow_pickle=False)
        # Each round adds at most the preset's bound on a weighted average of |x| ≤ 0.06.
        bound = r * preset.error_bound(0.06, len(CLIENTS), 3 * 100 / 1000)
        assert np.abs(got - expected[r]).max() <= bound, f"round {r}"
    assert (out / "rounds.jsonl").read_text().count("\n") == 2


def test_aggregator_kit_holds_nothing_that_can_decrypt(tmp_path: Path) -> None:
    root = provision(tmp_path, CLIENTS)
    agg = root / "aggregator"
    assert not (agg / "ckks-secret.ctx").exists()
    for path in sorted(p for p in agg.rglob("*") if p.is_file()):
        try:
            ctx = load_context(path.read_bytes())
        except SecureXFLError:
            continue  # not a context at all
        assert not ctx.has_secret_key(), path
        assert ctx.is_public()
    assert load_context((root / "keyholder" / "ckks-secret.ctx").read_bytes()).has_secret_key()


def test_packed_preset_over_real_processes(tmp_path: Path) -> None:
    """The compact fast path (xfl-packed) through the real services, with DP on."""
    root = provision(
        tmp_path,
        CLIENTS,
        federation={"rounds": 1, "min_clients": 3, "preset": "xfl-packed"},
        privacy={"noise_multiplier": 0.001, "clip_norm": 1.0},
        round={"timeout_s": 60.0, "weight_cap": 1000.0, "weighting": "client"},
    )
    run_to_completion(root, CLIENTS, f"vector:{NUMEL}")
    got = np.load(root / "agg-out" / "global-1.npy", allow_pickle=False)
    want = expected_models(CLIENTS, NUMEL, 1)[1]
    # DP noise std σC = 1e-3 on the weighted sum, divided by Σ weights ≥ 0.3; plus
    # quantisation error ≤ 1% of that noise.
    assert np.abs(got - want).max() < 6 * 1e-3 / 0.3
    assert np.abs(got - want).std() < 1e-3 / 0.3
    assert np.abs(want).max() > 0.01
