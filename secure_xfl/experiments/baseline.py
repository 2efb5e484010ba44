"""The non-private (or DP-SGD) reference run of a federation, as plaintext FedAvg in-process.

:func:`simulate` computes what the federation computes, without crypto or
processes: every client is the :class:`~secure_xfl.training.lm_trainer.LMTrainer`
its client process would build (same corpus, split and
:func:`~secure_xfl.training.lm_trainer.client_share`, same per-(seed, round,
client) batch stream), each update ``new − global`` is clipped to the
client-level ``clip_norm`` (if any) and weighted by ``min(1, n_i / cap)``
(client weighting, ``cap = local_steps × batch_size``), and the global model
moves by ``server_lr · Σ w_i u_i / Σ w_i``. The held-out metrics come from the
aggregator's :class:`~secure_xfl.training.federated_lm.LMEvaluator`.

Without DP-SGD the run is deterministic and matches a noise-free federation up to
CKKS rounding. The federation's DP-SGD noise comes from torch's randomly seeded
default generator, so a private run is reproduced in distribution only; here the
noise is drawn under a seed derived from (seed, round, client), so it repeats.

:func:`cached_simulate` keeps results as ``baseline-<key>.json``. Training runs
on the CPU; torch's thread settings are left to the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_xfl.training.data import default_documents, make_blocks, train_eval_split
from secure_xfl.training.federated_lm import DataSpec, LMEvaluator, initial_model
from secure_xfl.training.lm import LMConfig
from secure_xfl.training.lm_trainer import LMTrainer, client_share

__all__ = ["BASELINE_VERSION", "BaselineSpec", "cached_simulate", "simulate"]

BASELINE_VERSION = "secure-xfl-baseline-2"
"""Part of every cache key; bump it when :func:`simulate` changes what it computes."""

_MAX_CACHE_BYTES = 1 << 20
_METRICS = ("loss", "perplexity", "accuracy")

Progress = Callable[[int, dict[str, float]], None]
"""Called after each round with (round, held-out metrics)."""


@dataclass(frozen=True)
class BaselineSpec:
    """The settings of one simulated federation (what the cache key covers)."""

    clients: tuple[str, ...] = ("cloud-a", "cloud-b", "cloud-c")
    """Client names; they choose the data shares and the batch streams."""
    rounds: int = 5
    """Federated rounds."""
    local_steps: int = 20
    """Local optimiser steps per client per round."""
    local_lr: float = 3e-3
    """Local (AdamW) learning rate."""
    batch_size: int = 16
    """Local batch size (the expected Poisson batch under DP-SGD)."""
    seed: int = 0
    """``LMTrainer`` seed of the batch streams (the federation's client processes use 0)."""
    partition: str = "fixed"
    """``fixed`` or ``dirichlet`` (``dynamic`` follows measured throughputs: not simulable)."""
    server_lr: float = 1.0
    """Server step size applied to the weighted mean update."""
    dp_noise_multiplier: float | None = None
    """Record-level DP-SGD σ_r; None = no DP-SGD (non-private local training)."""
    dp_max_grad_norm: float = 1.0
    """Record-level per-sample clip C_r (used only with DP-SGD)."""
    clip_norm: float | None = None
    """Client-level L2 clip of each whole update before weighting; None = no clip."""

    def __post_init__(self) -> None:
        def positive(name: str, value: float | None) -> None:
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")

        if not self.clients or len(set(self.clients)) != len(self.clients):
            raise ValueError("clients must be non-empty and distinct")
        if min(self.rounds, self.local_steps, self.batch_size) < 1:
            raise ValueError("rounds, local_steps and batch_size must be >= 1")
        if self.partition not in ("fixed", "dirichlet"):
            raise ValueError(f"partition {self.partition!r} cannot be simulated")
        for name in ("local_lr", "server_lr", "dp_max_grad_norm", "clip_norm"):
            positive(name, getattr(self, name))
        sigma = self.dp_noise_multiplier
        if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"dp_noise_multiplier must be finite and >= 0, got {sigma!r}")

    @property
    def weight_cap(self) -> float:
        """The public weight cap of client weighting: local_steps × batch_size."""
        return float(self.local_steps * self.batch_size)

    def settings(self) -> dict[str, Any]:
        """The round settings a client's trainer receives (plus ``clients``)."""
        out: dict[str, Any] = {
            "rule": "fedavg",
            "local_steps": self.local_steps,
            "local_lr": self.local_lr,
            "batch_size": self.batch_size,
            "fedprox_mu": 0.0,
            "clients": sorted(self.clients),
        }
        if self.dp_noise_multiplier is not None:
            out["dp_sgd"] = {
                "noise_multiplier": self.dp_noise_multiplier,
                "max_grad_norm": self.dp_max_grad_norm,
            }
        return out

    def key(self) -> str:
        """Stable SHA-256 hex of the fields, the model config and :data:`BASELINE_VERSION`."""
        doc = {
            "version": BASELINE_VERSION,
            "spec": dataclasses.asdict(self),
            "model": dataclasses.asdict(LMConfig()),
            "data": dataclasses.asdict(DataSpec()),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def _noise_seed(seed: int, round: int, name: str) -> int:
    """A torch seed for one client's DP-SGD noise in one round."""
    state = np.random.SeedSequence([seed, round, *name.encode(), 0x44]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def _flat(update: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in names])


def _metrics(raw: dict[str, float]) -> dict[str, float]:
    return {k: float(raw[k]) for k in _METRICS}


def simulate(spec: BaselineSpec, progress: Progress | None = None) -> dict[str, Any]:
    """Run ``spec`` as plaintext FedAvg; the held-out metrics before and after each round.

    Returns ``{"key", "initial": {loss, perplexity, accuracy}, "rounds": [{round,
    loss, perplexity, accuracy, train_loss}], "spec", "seconds", "torch_threads"}``
    (JSON-ready). Non-private results can shift by a few per cent with torch's
    intra-op thread count (reduction order), which the cache key does not cover.
    """
    start = time.perf_counter()
    cfg, data = LMConfig(), DataSpec(partition=spec.partition)
    train, held = train_eval_split(make_blocks(default_documents(data.max_bytes), cfg.block_size))
    names = sorted(spec.clients)
    trainers = {
        c: LMTrainer(
            cfg,
            client_share(train, c, names, spec.partition, alpha=data.alpha),
            held,
            name=c,
            device="cpu",
            seed=spec.seed,
            progress=False,
        )
        for c in names
    }
    evaluator = LMEvaluator(cfg, data)
    state = {k: v.astype(np.float64) for k, v in initial_model(cfg).items()}
    order = list(state)
    shapes = {k: state[k].shape for k in order}
    sizes = [state[k].size for k in order]
    params = _flat(state, order)
    settings = spec.settings()
    initial = _metrics(evaluator(state))
    rounds: list[dict[str, float]] = []
    for rnd in range(1, spec.rounds + 1):
        total = np.zeros_like(params)
        weights, losses = 0.0, []
        for c in names:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_noise_seed(spec.seed, rnd, c))
                # The federation numbers rounds from 0 (the plan's round), and each
                # client's batch stream is seeded by it.
                result = trainers[c]._train(state, rnd - 1, settings)
            update = _flat(result.update, order)
            if spec.clip_norm is not None:
                norm = float(np.linalg.norm(update))
                if norm > spec.clip_norm:
                    update *= spec.clip_norm / norm
            if result.num_samples < 1:
                raise RuntimeError(f"{c} reported no training samples in round {rnd}")
            weight = min(float(result.num_samples), spec.weight_cap) / spec.weight_cap
            total += weight * update
            weights += weight
            if result.loss is not None:
                losses.append(float(result.loss))
        params = params + spec.server_lr * (total / weights)
        pieces = np.split(params, np.cumsum(sizes)[:-1])
        state = {k: p.reshape(shapes[k]) for k, p in zip(order, pieces, strict=True)}
        row: dict[str, float] = {"round": rnd, **_metrics(evaluator(state))}
        if losses and all(math.isfinite(x) for x in losses):
            row["train_loss"] = float(np.mean(losses))
        rounds.append(row)
        if progress is not None:
            progress(rnd, dict(row))
    return {
        "key": spec.key(),
        "initial": initial,
        "rounds": rounds,
        "spec": dataclasses.asdict(spec),
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _valid(obj: Any, spec: BaselineSpec) -> bool:
    """``obj`` has the key and shape :func:`simulate` returns for ``spec``."""
    if not isinstance(obj, dict) or obj.get("key") != spec.key():
        return False
    initial, rounds = obj.get("initial"), obj.get("rounds")
    if not isinstance(initial, dict) or not all(_finite(initial.get(k)) for k in _METRICS):
        return False
    if not isinstance(rounds, list) or len(rounds) != spec.rounds:
        return False
    for i, row in enumerate(rounds, start=1):
        if not isinstance(row, dict) or row.get("round") != i or isinstance(row["round"], bool):
            return False
        if not all(_finite(row.get(k)) for k in _METRICS):
            return False
    return isinstance(obj.get("spec"), dict) and _finite(obj.get("seconds"))


def _read(path: Path, spec: BaselineSpec) -> dict[str, Any] | None:
    """The cached result at ``path``, or None when absent, oversized or not valid."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_CACHE_BYTES + 1)
    except OSError:
        return None
    if len(raw) > _MAX_CACHE_BYTES:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if _valid(obj, spec) else None


def cached_simulate(
    spec: BaselineSpec, cache_dir: Path, progress: Progress | None = None
) -> dict[str, Any]:
    """:func:`simulate`, kept in ``cache_dir/baseline-<key>.json``.

    A present, valid file for the same key is returned as is; anything else
    (missing, truncated, oversized, other key or shape) is recomputed and
    atomically replaced (temporary file + ``os.replace``).
    """
    path = Path(cache_dir) / f"baseline-{spec.key()}.json"
    hit = _read(path, spec)
    if hit is not None:
        return hit
    result = simulate(spec, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(result, fh, allow_nan=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result
