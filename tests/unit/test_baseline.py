"""The in-process plaintext FedAvg baseline: it trains, repeats, and caches safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_xfl.experiments import baseline
from secure_xfl.experiments.baseline import BaselineSpec, cached_simulate, simulate

SPEC = BaselineSpec(clients=("cloud-b", "cloud-a"), rounds=1, local_steps=2, batch_size=8)


def test_simulate_trains_and_repeats(tmp_path: Path) -> None:
    seen: list[int] = []
    first = cached_simulate(SPEC, tmp_path, progress=lambda r, _m: seen.append(r))
    assert seen == [1]
    assert [r["round"] for r in first["rounds"]] == [1]
    assert first["rounds"][0]["loss"] != pytest.approx(first["initial"]["loss"], abs=1e-4)
    assert first["key"] == SPEC.key()
    path = tmp_path / f"baseline-{SPEC.key()}.json"
    assert json.loads(path.read_text())["rounds"] == first["rounds"]
    # A cache hit returns the stored result without training.
    assert cached_simulate(SPEC, tmp_path) == json.loads(path.read_text())
    # Recomputing gives the same numbers (deterministic without DP-SGD).
    again = simulate(SPEC)
    assert again["initial"] == first["initial"]
    assert again["rounds"] == first["rounds"]


def test_corrupt_cache_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"baseline-{SPEC.key()}.json"
    fake = {"key": SPEC.key(), "initial": {"loss": 1.0}, "rounds": [], "spec": {}, "seconds": 0}
    calls: list[BaselineSpec] = []

    def fake_simulate(spec: BaselineSpec, progress: object = None) -> dict[str, object]:
        calls.append(spec)
        return {
            "key": spec.key(),
            "initial": {"loss": 5.0, "perplexity": 148.0, "accuracy": 0.1},
            "rounds": [{"round": 1, "loss": 4.0, "perplexity": 54.6, "accuracy": 0.2}],
            "spec": {},
            "seconds": 1.0,
        }

    monkeypatch.setattr(baseline, "simulate", fake_simulate)
    for bad in (b"{not json", json.dumps(fake).encode(), b" " * (2 << 20)):
        path.write_bytes(bad)
        out = cached_simulate(SPEC, tmp_path)
        assert out["rounds"][0]["loss"] == 4.0
        assert json.loads(path.read_text())["initial"]["loss"] == 5.0
    assert len(calls) == 3
    # Now valid: served from the cache.
    cached_simulate(SPEC, tmp_path)
    assert len(calls) == 3


def test_spec_key_and_settings() -> None:
    assert SPEC.key() == BaselineSpec(**vars(SPEC)).key()
    assert SPEC.key() != BaselineSpec(clients=SPEC.clients, rounds=2).key()
    dp = BaselineSpec(dp_noise_multiplier=0.8, dp_max_grad_norm=0.5)
    assert dp.settings()["dp_sgd"] == {"noise_multiplier": 0.8, "max_grad_norm": 0.5}
    assert "dp_sgd" not in SPEC.settings()
    with pytest.raises(ValueError):
        BaselineSpec(partition="dynamic")
    with pytest.raises(ValueError):
        BaselineSpec(clip_norm=0.0)
