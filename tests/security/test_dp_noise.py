"""The noise in a released aggregate is at least what the accountant was told.

DESIGN §2 promise: "Because the key holder refuses small cohorts, the distributed
DP noise in every decrypted aggregate is at least what the accountant assumed."

A real run with client-level DP (σ = 1, C = 1, min_clients = 3): the client
processes clip, noise (σC/√K each), encrypt and upload; the key holder decrypts the
aggregate and writes σ_eff to its signed ledger. The test measures the noise actually
present in the released model — release minus the exact FedAvg of the clients'
known updates — in units of the release's sensitivity, and compares it with the
ledger's σ_eff (what the accountant computes ε from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_xfl.crypto import pem
from secure_xfl.kit import Kit
from secure_xfl.privacy.ledger import read_ledger
from secure_xfl.services.keyholder import LEDGER_FILE
from secure_xfl.training.trainer import RandomTrainer
from tests.federation import federation
from tests.security import live

pytestmark = pytest.mark.timeout(240)

NUMEL = 4000
SIGMA, CLIP, K = 1.0, 1.0, 3


def test_released_noise_is_at_least_the_ledgers_sigma(tmp_path: Path) -> None:
    """§2 "the distributed DP noise in every decrypted aggregate is at least what the
    accountant assumed": measured noise multiplier of the real release ≥ 0.95 × the
    σ_eff in the key holder's ledger, and matches the distributed-noise model."""
    root = live.provision_run(
        tmp_path,
        live.HONEST,
        min_clients=K,
        timeout_s=120.0,
        privacy={"noise_multiplier": SIGMA, "clip_norm": CLIP},
    )
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in live.HONEST:
            fed.start_client(c)
        assert fed.wait("aggregator", timeout=150) == 0, fed.logs()
    model = live.zero_model(NUMEL)
    exact, _ = live.expected_average(live.HONEST, 0, model)
    assert max(np.linalg.norm(live.update_vector(c, 0, model)) for c in live.HONEST) < CLIP
    released = np.load(root / "agg-out" / "global-1.npy", allow_pickle=False)
    noise = released - exact
    w = np.array([RandomTrainer.samples_for(c) / live.WEIGHT_CAP for c in live.HONEST])
    # One client moves the weighted average by at most C·max(w)/Σw (its sensitivity).
    sensitivity = CLIP * w.max() / w.sum()
    measured = float(noise.std()) / sensitivity
    kh = root / "keyholder"
    (entry,) = read_ledger(kh / "state" / LEDGER_FILE, pem.load_certificate(kh / "cert.pem"))
    assumed = float(entry["noise_multiplier"])
    weighting = Kit.load(root / "aggregator").config.round.weighting
    # Expected std of the released average under the distributed-noise model.
    per_client = SIGMA * CLIP / np.sqrt(K)
    if weighting == "client":
        model_std = per_client * np.sqrt(len(w)) / w.sum()
    else:
        model_std = per_client * np.sqrt((w**2).sum()) / w.sum()
    print(
        f"\nDP release ({weighting} weighting): measured σ = {measured:.3f} "
        f"(noise std {noise.std():.5f}, model {model_std:.5f}); ledger σ_eff = {assumed:.3f}"
    )
    assert assumed > 0 and entry["participants"] == sorted(live.HONEST)
    assert measured >= 0.95 * assumed
    assert abs(noise.std() / model_std - 1) < 0.05
    assert abs(noise.mean()) < 4 * noise.std() / np.sqrt(NUMEL)
