"""Server update rules applied to the decrypted aggregate (DESIGN §3).

The key holder returns Σ wᵢ uᵢ / Σ wᵢ, the weighted average of the clients'
updates; what the weights are (sample counts for FedAvg, e^{-Lᵢ} for dynamic
weighting) is decided on the client side and signed. A rule turns that average
into the next global model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from secure_xfl.errors import ConfigError

RULES = ("fedavg", "dynamic", "gradient", "async", "fedadam", "fedyogi", "fedadagrad")


def client_weight(
    rule: str,
    num_samples: int,
    loss: float | None,
    weight_cap: float,
    loss_ref: float | None = None,
) -> float:
    """The signed weight a client attaches to its update under ``rule``.

    FedAvg / gradient / adaptive optimisers: n_i clamped to the public cap.
    Dynamic: e^{-(L_i - L_ref)}, so the key holder's normalisation yields
    α_i = e^{-L_i} / Σ_j e^{-L_j} (a common shift cancels). L_ref is public (the
    smallest loss reported in the previous round), which keeps weights near 1 —
    tiny weights would shrink each update but not its DP noise. Weights are
    clamped to ≤ 1 so no contribution exceeds the clip norm; in the first round
    (no reference yet) every client weighs 1.
    """
    if rule == "dynamic":
        if loss is None or not math.isfinite(loss) or loss < 0:
            raise ConfigError("dynamic weighting needs a finite, non-negative reported loss")
        if loss_ref is None:
            return 1.0
        return min(1.0, max(math.exp(-(loss - loss_ref)), 1e-12))
    if num_samples < 1:
        raise ConfigError("a client must report at least one sample")
    return min(float(num_samples), weight_cap)


@dataclass
class ServerRule:
    """Applies the averaged update to the global parameters (flat float64)."""

    name: str = "fedavg"
    """One of :data:`RULES`."""
    lr: float = 1.0
    """Server learning rate (η for gradient aggregation, step size for adaptive rules)."""
    beta1: float = 0.9
    """Adaptive rules: momentum."""
    beta2: float = 0.99
    """Adaptive rules: second-moment decay."""
    tau: float = 1e-3
    """Adaptive rules: adaptivity (ε in the denominator)."""
    _m: np.ndarray | None = field(default=None, repr=False)
    _v: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ConfigError(f"unknown aggregation rule {self.name!r}; known: {RULES}")

    @property
    def sends_gradient(self) -> bool:
        """Gradient aggregation: clients send ∇w, not the change of w."""
        return self.name == "gradient"

    def apply(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        """Next global parameters from the current ones and the decrypted average."""
        if self.name in ("fedavg", "dynamic", "async"):
            # w_{t+1} = Σ (n_i/n) w_i = w_t + Σ (n_i/n) Δ_i (times a server lr, 1 by default)
            return current + self.lr * average
        if self.name == "gradient":
            # w_{t+1} = w_t − η Σ (n_i/n) ∇w_i
            return current - self.lr * average
        # Adaptive federated optimisation (Reddi et al. 2021): the average delta is a
        # pseudo-gradient fed to Adam / Yogi / Adagrad on the server.
        delta = average
        self._m = (
            delta * (1 - self.beta1)
            if self._m is None
            else (self.beta1 * self._m + (1 - self.beta1) * delta)
        )
        sq = delta * delta
        if self._v is None:
            self._v = np.full_like(delta, self.tau**2)
        if self.name == "fedadagrad":
            self._v = self._v + sq
        elif self.name == "fedadam":
            self._v = self.beta2 * self._v + (1 - self.beta2) * sq
        else:  # fedyogi
            self._v = self._v - (1 - self.beta2) * sq * np.sign(self._v - sq)
        new: np.ndarray = current + self.lr * self._m / (np.sqrt(self._v) + self.tau)
        return new
