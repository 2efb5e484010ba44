"""Server update rules applied to the decrypted aggregate (DESIGN §3).

The key holder returns Σ wᵢ uᵢ / Σ wᵢ, the weighted average of the clients'
updates; what the weights are (sample counts for FedAvg, e^{-Lᵢ} for dynamic
weighting) is decided on the client side and signed. A rule turns that average
into the next global model.

One :class:`AggregationRule` subclass per rule, registered under its ``name``;
:func:`make_rule` builds one. Import fails loudly unless the registered names
are exactly those of :data:`secure_xfl.config.Rule`, which the config parser checks.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import ClassVar, TypeVar, get_args

import numpy as np

from secure_xfl.config import Rule
from secure_xfl.errors import ConfigError

__all__ = [
    "RULES",
    "AdaptiveRule",
    "AggregationRule",
    "AsyncRule",
    "DynamicRule",
    "FedAdagradRule",
    "FedAdamRule",
    "FedAvgRule",
    "FedYogiRule",
    "GradientRule",
    "ServerRule",
    "client_weight",
    "make_rule",
    "register",
    "rule_names",
]


class AggregationRule(abc.ABC):
    """Turns the decrypted weighted average into the next global parameters."""

    name: ClassVar[str]
    """Registry key; one of :data:`secure_xfl.config.Rule`."""
    _sends_gradient: ClassVar[bool] = False
    _buffered: ClassVar[bool] = False

    def __init__(self, *, lr: float = 1.0) -> None:
        """``lr``: server learning rate (η for gradient aggregation, step size for adaptive)."""
        self.lr = lr

    @abc.abstractmethod
    def apply(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        """Next global parameters (flat float64) from the current ones and the average."""

    def client_weight(
        self, num_samples: int, loss: float | None, weight_cap: float, loss_ref: float | None = None
    ) -> float:
        """The signed weight a client attaches: n_i clamped to the public cap."""
        if num_samples < 1:
            raise ConfigError("a client must report at least one sample")
        return min(float(num_samples), weight_cap)

    @property
    def sends_gradient(self) -> bool:
        """Gradient aggregation: clients send ∇w, not the change of w."""
        return self._sends_gradient

    @property
    def buffered(self) -> bool:
        """Buffered asynchronous aggregation: a round closes on the first ``min_clients``."""
        return self._buffered

    def state(self) -> dict[str, np.ndarray]:
        """Checkpointable server-optimiser state; stateless rules have none."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state`; a stateless rule accepts only an empty mapping."""
        if state:
            raise ConfigError(f"rule {self.name!r} is stateless; got state {sorted(state)}")


RULES: dict[str, type[AggregationRule]] = {}
"""Rule name → class, in registration order (iterates over the names)."""

_R = TypeVar("_R", bound=type[AggregationRule])


def register(cls: _R) -> _R:
    """Class decorator: add ``cls`` to :data:`RULES` under ``cls.name`` (once)."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must define its own class attribute 'name'")
    if name in RULES:
        raise ValueError(f"aggregation rule {name!r} is already registered by {RULES[name]}")
    RULES[name] = cls
    return cls


def rule_names() -> tuple[str, ...]:
    """Registered rule names, in registration order."""
    return tuple(RULES)


def make_rule(name: str, *, lr: float = 1.0) -> AggregationRule:
    """A fresh instance of the rule called ``name`` with server learning rate ``lr``."""
    if name not in RULES:
        raise ConfigError(f"unknown aggregation rule {name!r}; known: {rule_names()}")
    return RULES[name](lr=lr)


@register
class FedAvgRule(AggregationRule):
    """FedAvg: step by the sample-weighted average of the clients' model changes."""

    name = "fedavg"

    def apply(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        """w_t + lr · average."""
        # w_{t+1} = Σ (n_i/n) w_i = w_t + Σ (n_i/n) Δ_i (times a server lr, 1 by default)
        return current + self.lr * average


@register
class DynamicRule(FedAvgRule):
    """FedAvg step with loss-based client weights α_i = e^{-L_i} / Σ_j e^{-L_j}."""

    name = "dynamic"

    def client_weight(
        self, num_samples: int, loss: float | None, weight_cap: float, loss_ref: float | None = None
    ) -> float:
        """e^{-(L_i - L_ref)} clamped to [1e-12, 1]; 1 while there is no reference.

        The key holder's normalisation yields α_i = e^{-L_i} / Σ_j e^{-L_j} (a
        common shift cancels). L_ref is public (the smallest loss reported in the
        previous round), which keeps weights near 1 — tiny weights would shrink
        each update but not its DP noise. Weights are clamped to ≤ 1 so no
        contribution exceeds the clip norm; in the first round (no reference yet)
        every client weighs 1.
        """
        if loss is None or not math.isfinite(loss) or loss < 0:
            raise ConfigError("dynamic weighting needs a finite, non-negative reported loss")
        if loss_ref is None:
            return 1.0
        return min(1.0, max(math.exp(-(loss - loss_ref)), 1e-12))


@register
class GradientRule(AggregationRule):
    """Gradient aggregation: clients send gradients, the server takes one SGD step."""

    name = "gradient"
    _sends_gradient = True

    def apply(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        """w_t − lr · average."""
        # w_{t+1} = w_t − η Σ (n_i/n) ∇w_i
        return current - self.lr * average


@register
class AsyncRule(FedAvgRule):
    """Buffered asynchronous FedAvg: the FedAvg step over whichever buffer closed."""

    name = "async"
    _buffered = True


class AdaptiveRule(AggregationRule):
    """Adaptive federated optimisation (Reddi et al. 2021): the average delta is a
    pseudo-gradient fed to Adam / Yogi / Adagrad on the server (subclasses set v's update)."""

    def __init__(
        self, *, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        """``beta1``: momentum; ``beta2``: second-moment decay; ``tau``: adaptivity (ε)."""
        super().__init__(lr=lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None

    @abc.abstractmethod
    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        """Next v from the previous one and the squared pseudo-gradient."""

    def apply(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        """w_t + lr · m_t / (√v_t + τ), updating the moments m and v."""
        delta = average
        if self._m is None or self._v is None:  # m₀ = 0, v₀ = τ²
            self._m, self._v = np.zeros_like(delta), np.full_like(delta, self.tau**2)
        self._m = self.beta1 * self._m + (1 - self.beta1) * delta
        self._v = self._second_moment(self._v, delta * delta)
        new: np.ndarray = current + self.lr * self._m / (np.sqrt(self._v) + self.tau)
        return new

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the moments ``m`` and ``v``; empty before the first step."""
        if self._m is None or self._v is None:
            return {}
        return {"m": self._m.copy(), "v": self._v.copy()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore ``{"m", "v"}`` (same-shape flat arrays), or reset with ``{}``."""
        if not state:
            self._m = self._v = None
            return
        if set(state) != {"m", "v"}:
            raise ConfigError(f"rule {self.name!r} state needs keys m and v; got {sorted(state)}")
        m = np.array(state["m"], dtype=np.float64)
        v = np.array(state["v"], dtype=np.float64)
        if m.ndim != 1 or m.shape != v.shape:
            raise ConfigError(f"rule {self.name!r} state: m {m.shape} and v {v.shape} mismatch")
        self._m, self._v = m, v


@register
class FedAdamRule(AdaptiveRule):
    """FedAdam: v ← β₂ v + (1 − β₂) Δ²."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * sq


@register
class FedYogiRule(AdaptiveRule):
    """FedYogi: v ← v − (1 − β₂) Δ² sign(v − Δ²)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        new: np.ndarray = v - (1 - self.beta2) * sq * np.sign(v - sq)
        return new


@register
class FedAdagradRule(AdaptiveRule):
    """FedAdagrad: v ← v + Δ²."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> np.ndarray:
        new: np.ndarray = v + sq
        return new


_CONFIG_NAMES = get_args(Rule)
if sorted(RULES) != sorted(_CONFIG_NAMES):
    raise RuntimeError(
        "aggregation rule registry and secure_xfl.config.Rule disagree: "
        f"registered {rule_names()}, config {_CONFIG_NAMES}"
    )


def client_weight(
    rule: str,
    num_samples: int,
    loss: float | None,
    weight_cap: float,
    loss_ref: float | None = None,
) -> float:
    """Compatibility wrapper: ``make_rule(rule).client_weight(...)``."""
    return make_rule(rule).client_weight(num_samples, loss, weight_cap, loss_ref)


def ServerRule(name: str = "fedavg", lr: float = 1.0) -> AggregationRule:
    """Compatibility wrapper: ``make_rule(name, lr=lr)`` (old dataclass call shape)."""
    return make_rule(name, lr=lr)
