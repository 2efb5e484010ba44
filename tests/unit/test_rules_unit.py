"""Aggregation rules in isolation: update formulas, adaptive state, registry, client weights."""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest

from secure_xfl.config import Rule
from secure_xfl.errors import ConfigError
from secure_xfl.protocol import rules
from secure_xfl.protocol.rules import (
    RULES,
    AggregationRule,
    FedAvgRule,
    ServerRule,
    client_weight,
    make_rule,
    register,
    rule_names,
)

ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
RNG = np.random.default_rng(7)
CURRENT = RNG.normal(size=6)
AVERAGES = [RNG.normal(scale=0.1, size=6) for _ in range(3)]


@pytest.mark.parametrize(
    ("name", "sign"), [("fedavg", 1.0), ("dynamic", 1.0), ("async", 1.0), ("gradient", -1.0)]
)
def test_plain_rules_apply(name: str, sign: float) -> None:
    rule = make_rule(name, lr=0.5)
    got = rule.apply(CURRENT, AVERAGES[0])
    want = np.array([c + sign * 0.5 * a for c, a in zip(CURRENT, AVERAGES[0], strict=True)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert got.dtype == np.float64 and got.shape == CURRENT.shape
    assert rule.sends_gradient is (name == "gradient")
    assert rule.buffered is (name == "async")
    assert rule.state() == {}


def reference(name: str, lr: float, steps: int) -> list[list[float]]:
    """Reddi et al.'s server optimisers, element by element in plain floats."""
    b1, b2, tau = 0.9, 0.99, 1e-3
    w = [float(x) for x in CURRENT]
    m = [0.0] * len(w)
    v = [tau * tau] * len(w)
    out = []
    for t in range(steps):
        for i, d in enumerate(float(x) for x in AVERAGES[t]):
            m[i] = b1 * m[i] + (1 - b1) * d
            if name == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            elif name == "fedyogi":
                s = v[i] - d * d
                v[i] = v[i] - (1 - b2) * d * d * (1.0 if s > 0 else -1.0 if s < 0 else 0.0)
            else:
                v[i] = v[i] + d * d
            w[i] = w[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(w))
    return out


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_rules_match_reference_loop(name: str) -> None:
    rule = make_rule(name, lr=0.01)
    assert not rule.sends_gradient and not rule.buffered
    params = CURRENT.copy()
    for step, want in enumerate(reference(name, 0.01, 3)):
        params = rule.apply(params, AVERAGES[step])
        np.testing.assert_allclose(params, want, rtol=1e-12, atol=1e-14)
    # Adaptive steps differ from a plain FedAvg step.
    assert np.abs(params - (CURRENT + 0.01 * sum(AVERAGES))).max() > 1e-3


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_state_round_trip(name: str) -> None:
    a = make_rule(name, lr=0.01)
    assert a.state() == {}
    params = a.apply(CURRENT, AVERAGES[0])
    state = a.state()
    assert set(state) == {"m", "v"}
    b = make_rule(name, lr=0.01)
    b.load_state(state)
    state["m"][:] = 123.0  # state() hands out copies; mutating them changes nothing
    for avg in AVERAGES[1:]:
        pa, pb = a.apply(params, avg), b.apply(params, avg)
        np.testing.assert_array_equal(pa, pb)
        params = pa
    for k, arr in a.state().items():
        np.testing.assert_array_equal(arr, b.state()[k])
    # {} resets to a fresh optimiser.
    b.load_state({})
    np.testing.assert_array_equal(
        b.apply(CURRENT, AVERAGES[0]), make_rule(name, lr=0.01).apply(CURRENT, AVERAGES[0])
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"m": np.zeros(3)},
        {"m": np.zeros(3), "v": np.zeros(3), "x": np.zeros(3)},
        {"m": np.zeros(3), "v": np.zeros(4)},
        {"m": np.zeros((3, 1)), "v": np.zeros((3, 1))},
    ],
)
def test_adaptive_load_state_refuses_malformed(bad: dict[str, np.ndarray]) -> None:
    with pytest.raises(ConfigError):
        make_rule("fedadam").load_state(bad)


@pytest.mark.parametrize("name", ["fedavg", "dynamic", "gradient", "async"])
def test_stateless_rules_accept_only_empty_state(name: str) -> None:
    rule = make_rule(name)
    rule.load_state({})
    with pytest.raises(ConfigError):
        rule.load_state({"m": np.zeros(3)})


def test_registry_matches_config_literal() -> None:
    assert set(RULES) == set(get_args(Rule))
    assert rule_names() == tuple(RULES)
    assert sorted(rule_names()) == sorted(get_args(Rule))
    for name, cls in RULES.items():
        assert cls.name == name
        rule = make_rule(name, lr=0.25)
        assert isinstance(rule, cls) and isinstance(rule, AggregationRule)
        assert rule.lr == 0.25
    # The tuple-of-names use of RULES still works: membership and iteration over names.
    assert "fedavg" in RULES and list(RULES) == list(rule_names())


def test_unknown_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown aggregation rule 'fedprox'; known: "):
        make_rule("fedprox")
    with pytest.raises(ConfigError):
        ServerRule("fedprox")
    with pytest.raises(ConfigError):
        client_weight("fedprox", 10, 0.5, 100.0)


def test_duplicate_registration_refused() -> None:
    before = dict(RULES)

    class Again(FedAvgRule):
        name = "fedavg"

    with pytest.raises(ValueError, match="already registered"):
        register(Again)

    class Nameless(FedAvgRule):
        pass

    with pytest.raises(TypeError):
        register(Nameless)  # inherits fedavg's name: must spell its own
    assert before == RULES


def test_compat_wrappers() -> None:
    rule = ServerRule(name="gradient", lr=0.5)
    assert isinstance(rule, rules.GradientRule) and rule.lr == 0.5 and rule.sends_gradient
    assert isinstance(ServerRule(), FedAvgRule) and ServerRule().lr == 1.0
    assert client_weight("fedavg", 7, None, 100.0) == 7.0
    assert client_weight("dynamic", 7, 1.0, 100.0, 0.5) == make_rule("dynamic").client_weight(
        7, 1.0, 100.0, 0.5
    )


@pytest.mark.parametrize("name", ["fedavg", "gradient", "async", *ADAPTIVE])
def test_sample_weights(name: str) -> None:
    rule = make_rule(name)
    assert rule.client_weight(30, None, 100.0) == 30.0
    assert rule.client_weight(500, 0.3, 100.0) == 100.0  # clamped to the public cap
    assert isinstance(rule.client_weight(1, None, 100.0), float)
    for n in (0, -1):
        with pytest.raises(ConfigError):
            rule.client_weight(n, None, 100.0)


def test_dynamic_weights_normalise_to_softmax_of_negative_loss() -> None:
    rule = make_rule("dynamic")
    losses = [0.4, 1.3, 2.2]
    ref = min(losses)  # the previous round's smallest reported loss
    w = [rule.client_weight(10, loss, 1.0, ref) for loss in losses]
    assert all(0 < x <= 1 for x in w) and max(w) == 1.0
    normalised = [x / sum(w) for x in w]  # what the key holder's Σwu/Σw applies
    z = sum(math.exp(-loss) for loss in losses)
    for got, loss in zip(normalised, losses, strict=True):
        assert got == pytest.approx(math.exp(-loss) / z, rel=1e-12)


def test_dynamic_weight_edges() -> None:
    rule = make_rule("dynamic")
    assert rule.client_weight(10, 5.0, 1.0) == 1.0  # no reference yet: every client weighs 1
    assert rule.client_weight(0, 5.0, 1.0) == 1.0  # sample count plays no part
    assert rule.client_weight(10, 0.1, 1.0, 0.5) == 1.0  # clamped to ≤ 1
    assert rule.client_weight(10, 1000.0, 1.0, 0.0) == 1e-12  # and ≥ 1e-12
    for bad in (None, -0.1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="finite, non-negative"):
            rule.client_weight(10, bad, 1.0, 0.0)
