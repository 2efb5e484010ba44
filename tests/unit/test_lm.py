"""Model building, local training, evaluation and the LMTrainer adapter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from secure_xfl.training.data import Blocks, default_documents, make_blocks, train_eval_split
from secure_xfl.training.dp_sgd import DPSGDError
from secure_xfl.training.lm import (
    LMConfig,
    ModelError,
    build_model,
    evaluate,
    is_rank_zero,
    load_trainable,
    local_train,
    num_trainable,
    trainable_state,
)
from secure_xfl.training.lm_trainer import LMTrainer, SettingsError
from secure_xfl.training.trainer import TrainResult

CFG = LMConfig()
SETTINGS: dict[str, Any] = {"rule": "fedavg", "local_steps": 4, "local_lr": 3e-3, "batch_size": 8}


@pytest.fixture(scope="module")
def split() -> tuple[Blocks, Blocks]:
    return train_eval_split(make_blocks(default_documents(120_000), CFG.block_size))


def _trainer(split: tuple[Blocks, Blocks], **kw: Any) -> LMTrainer:
    return LMTrainer(CFG, split[0], split[1], name="c0", device="cpu", eval_max_blocks=64, **kw)


def _dist(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def test_two_builds_are_identical_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m1, m2 = build_model(CFG), build_model(CFG)
    assert torch.equal(torch.get_rng_state(), before)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert list(s1) == list(s2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    t1, t2 = trainable_state(m1), trainable_state(m2)
    assert list(t1) == list(t2)
    assert all(v.dtype == np.float32 for v in t1.values())
    other = trainable_state(build_model(LMConfig(seed=1)))
    assert any(not np.array_equal(t1[k], other[k]) for k in t1)


def test_default_trainable_set_is_lora_plus_embeddings_and_norms() -> None:
    model = build_model(CFG)
    names = list(trainable_state(model))
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("base_model.model.transformer.") for n in names)
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 4 * CFG.n_layer
    assert any(n.endswith("wte.weight") for n in names)
    assert any(n.endswith("wpe.weight") for n in names)
    assert any(n.endswith("ln_f.weight") for n in names)
    assert not any(n.endswith("c_attn.base_layer.weight") for n in names)
    assert num_trainable(model) == sum(v.size for v in trainable_state(model).values())
    full = build_model(LMConfig(full_finetune=True))
    assert num_trainable(full) == sum(p.numel() for p in full.parameters())
    adapters = build_model(LMConfig(also_train=()))
    assert all("lora_" in n for n in trainable_state(adapters))


def test_load_trainable_rejects_what_does_not_fit() -> None:
    model = build_model(CFG)
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(ModelError, match="missing"):
        load_trainable(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ModelError, match="shape"):
        load_trainable(model, {**state, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(ModelError, match="non-finite"):
        load_trainable(model, {**state, name: np.full_like(state[name], np.nan)})
    state[name] = state[name] + 1.0
    load_trainable(model, state)
    assert np.array_equal(trainable_state(model)[name], state[name])


def test_local_steps_reduce_the_loss_and_metrics_are_finite(split: tuple[Blocks, Blocks]) -> None:
    train, held = split
    model = build_model(CFG)
    before = evaluate(model, held, "cpu", max_blocks=64)
    assert before["loss"] == pytest.approx(math.log(CFG.vocab_size), abs=0.1)
    loss, seen = local_train(
        model, train, steps=25, lr=1e-2, batch_size=16, rng=np.random.default_rng(0)
    )
    assert seen == 25 * 16 and math.isfinite(loss)
    after = evaluate(model, held, "cpu", max_blocks=64)
    assert after["loss"] < before["loss"] - 1.0
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert 0 <= before["accuracy"] < after["accuracy"] <= 1


def test_fedprox_pulls_toward_the_global_model(split: tuple[Blocks, Blocks]) -> None:
    dists = {}
    for mu in (0.0, 50.0):
        model = build_model(CFG)
        start = trainable_state(model)
        local_train(
            model, split[0], steps=8, lr=1e-2, batch_size=8, fedprox_mu=mu,
            global_state=start, rng=np.random.default_rng(0), optimizer="sgd",
        )  # fmt: skip
        dists[mu] = _dist(trainable_state(model), start)
    assert 0 < dists[50.0] < 0.8 * dists[0.0]


def test_update_is_new_minus_global_exactly(split: tuple[Blocks, Blocks]) -> None:
    trainer = _trainer(split)
    glob = trainer.initial_state()
    res = trainer.train(glob, 0, SETTINGS)
    assert isinstance(res, TrainResult)
    new = trainable_state(trainer.model)
    assert list(res.update) == list(glob)
    for k in glob:
        assert res.update[k].dtype == np.float32
        assert np.array_equal(res.update[k], new[k] - glob[k])
    assert res.num_samples == 4 * 8
    assert res.loss is not None and math.isfinite(res.loss)
    assert res.metrics is not None and res.metrics["throughput"] > 0
    # Same inputs give the same update (per-round seeded batches).
    again = trainer.train(glob, 0, SETTINGS)
    assert all(np.array_equal(again.update[k], res.update[k]) for k in glob)
    other = trainer.train(glob, 1, SETTINGS)
    assert any(not np.array_equal(other.update[k], res.update[k]) for k in glob)


def test_gradient_rule_returns_the_gradient(split: tuple[Blocks, Blocks]) -> None:
    trainer = _trainer(split, optimizer="sgd")
    glob = trainer.initial_state()
    one = {**SETTINGS, "local_steps": 1, "local_lr": 0.5}
    grad = trainer.train(glob, 3, {**one, "rule": "gradient"}).update
    delta = trainer.train(glob, 3, one).update
    # One SGD step: new − old = −lr · ∇, so the server's w − η·g with η = lr matches.
    for k in glob:
        np.testing.assert_allclose(delta[k], -0.5 * grad[k], rtol=1e-4, atol=1e-7)
    assert sum(float(np.abs(g).sum()) for g in grad.values()) > 0


def test_trainer_evaluate_and_settings_validation(split: tuple[Blocks, Blocks]) -> None:
    trainer = _trainer(split)
    metrics = trainer.evaluate(trainer.initial_state())
    assert set(metrics) == {"loss", "perplexity", "accuracy"}
    assert all(math.isfinite(v) for v in metrics.values())
    glob = trainer.initial_state()
    for bad in ({"local_steps": 0}, {"local_lr": "x"}, {"batch_size": None}, {"fedprox_mu": -1}):
        with pytest.raises(SettingsError):
            trainer.train(glob, 0, {**SETTINGS, **bad})
    with pytest.raises(DPSGDError):
        trainer.train(glob, 0, {**SETTINGS, "dp_sgd": {"noise_multiplier": 1.0}})
    assert is_rank_zero()


def test_dp_sgd_trains_accounts_and_cleans_up(split: tuple[Blocks, Blocks]) -> None:
    trainer = _trainer(split)
    glob = trainer.initial_state()
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    res = trainer.train(glob, 0, {**SETTINGS, "dp_sgd": dp, "fedprox_mu": 0.1})
    assert res.metrics is not None
    eps1 = res.metrics["dp_sgd_epsilon"]
    assert 0 < eps1 < math.inf and res.loss is not None and math.isfinite(res.loss)
    assert any(np.abs(u).sum() > 0 for u in res.update.values())
    res2 = trainer.train(glob, 1, {**SETTINGS, "dp_sgd": dp})
    assert res2.metrics is not None and res2.metrics["dp_sgd_epsilon"] > eps1
    # Opacus' hooks are gone: plain training works and leaves no per-sample grads.
    trainer.train(glob, 2, SETTINGS)
    assert not any(hasattr(p, "grad_sample") for p in trainer.model.parameters())


def test_slow_factor_lowers_throughput(split: tuple[Blocks, Blocks]) -> None:
    res = _trainer(split, slow_factor=1.0).train(
        _trainer(split).initial_state(), 0, {**SETTINGS, "local_steps": 2}
    )
    assert res.metrics is not None
    assert res.metrics["seconds"] >= 1.9 * res.metrics["compute_seconds"]


def test_from_settings_gives_each_client_its_own_share() -> None:
    kw: dict[str, Any] = {"clients": ["a", "b", "c"], "max_bytes": 60_000, "device": "cpu"}
    shares = [LMTrainer.from_settings(c, **kw) for c in ("a", "b", "c")]
    rows = [{r.tobytes() for r in t.blocks.tokens} for t in shares]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2])
    train, _ = train_eval_split(make_blocks(default_documents(60_000), CFG.block_size))
    assert sum(len(t.blocks) for t in shares) == len(train)
    skewed = LMTrainer.from_settings("a", partition="dirichlet", alpha=0.1, **kw)
    assert len(np.unique(skewed.blocks.labels)) < len(train.label_names)
    fast = LMTrainer.from_settings(
        "a", partition="dynamic", throughputs={"a": 3.0, "b": 1.0, "c": 1.0}, **kw
    )
    assert abs(len(fast.blocks) - 0.6 * len(train)) <= 2  # ∝ throughput, ±rounding
