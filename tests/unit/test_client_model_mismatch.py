"""A client whose trainer does not fit the aggregator's model says which flags must match."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_xfl.config import KitConfig, PrivacySettings, RecordPrivacySettings
from secure_xfl.crypto.context import get_preset
from secure_xfl.errors import TrainingError
from secure_xfl.kit import Kit, provision
from secure_xfl.protocol.client import Train
from secure_xfl.protocol.proposal import CoordinatorSettings, propose_plan
from secure_xfl.services.client import ClientService
from secure_xfl.training.lm import ModelError
from secure_xfl.training.trainer import TrainResult


class LMShapedTrainer:
    """Stands in for LMTrainer: refuses a state it has no parameters for."""

    def train(
        self, model: dict[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        raise ModelError(f"state does not match: unexpected {sorted(model)}")


def test_mismatch_names_the_flags(tmp_path: Path) -> None:
    cfg = KitConfig(
        privacy=PrivacySettings(noise_multiplier=1.0, record=RecordPrivacySettings(enabled=False))
    )
    kits = provision(tmp_path / "fed", federation="f", clients=["a"], cfg=cfg)
    kit = Kit.load(kits["client-a"], role="client")
    service = ClientService(kit, aggregator="127.0.0.1:9", trainer=LMShapedTrainer())
    model = {"weight": np.zeros(16, dtype=np.float32)}
    settings = CoordinatorSettings(run=kit.config.federation.run, rounds=1, min_clients=1,
                                   timeout_s=1.0, dp=kit.config.dp_spec())  # fmt: skip
    plan = propose_plan(settings, round=0, model=model, preset=get_preset("xfl-default"),
                        rule="fedavg", enrolled=1)  # fmt: skip
    with pytest.raises(TrainingError) as info:
        service._train(Train(plan=plan, dp=plan.dp, model=model, hints={}), None)
    text = str(info.value)
    assert "--model lm" in text and "--trainer lm" in text and "weight" in text
    assert not isinstance(info.value, ModelError)
