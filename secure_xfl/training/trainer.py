"""The trainer interface: what local training hands back, and a synthetic trainer.

ML code only: nothing here knows about rounds, messages or encryption.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["RandomTrainer", "TrainResult", "Trainer"]


@dataclass(frozen=True)
class TrainResult:
    """What local training hands back."""

    update: dict[str, np.ndarray]
    """Change of each trainable tensor (or its gradient for gradient aggregation)."""
    num_samples: int
    """Training examples used (FedAvg weight)."""
    loss: float | None = None
    """Mean training loss (dynamic weighting)."""
    metrics: Mapping[str, float] | None = None
    """Anything else worth logging."""


class Trainer(Protocol):
    """Local training for one round."""

    def train(
        self, model: dict[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        """Train from the global ``model``; return the update."""
        ...


class RandomTrainer:
    """Deterministic pseudo-random updates, for integration tests and transport checks.

    Client c's update in round r is N(0, scale²) drawn from a generator seeded by
    (seed, crc32(c), r), so a test can recompute every expected aggregate.
    """

    def __init__(
        self, client: str, *, seed: int = 0, scale: float = 0.01, delay_s: float = 0.0
    ) -> None:
        self.client = client
        self.seed = seed
        self.scale = scale
        self.delay_s = delay_s  # simulated slow cloud

    @staticmethod
    def samples_for(client: str) -> int:
        """Fixed, distinct per-client sample counts (so FedAvg weights differ)."""
        return 100 + zlib.crc32(client.encode()) % 900

    @staticmethod
    def update_for(
        client: str, round: int, model: Mapping[str, np.ndarray], seed: int = 0, scale: float = 0.01
    ) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, zlib.crc32(client.encode()), round])
        return {
            k: rng.normal(scale=scale, size=v.shape).astype(np.float32)
            for k, v in sorted(model.items())
        }

    @staticmethod
    def loss_for(client: str) -> float:
        """A fixed, distinct per-client reported loss in [1, 2) (dynamic weighting)."""
        return 1.0 + (zlib.crc32(client.encode()) % 100) / 100

    def train(
        self, model: dict[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        start = time.monotonic()
        time.sleep(self.delay_s)
        n = self.samples_for(self.client)
        return TrainResult(
            update=self.update_for(self.client, round, model, self.seed, self.scale),
            num_samples=n,
            loss=self.loss_for(self.client),
            metrics={"throughput": n / max(time.monotonic() - start, 1e-3)},
        )
