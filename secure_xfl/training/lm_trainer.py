"""The language-model :class:`~secure_xfl.training.trainer.Trainer`.

:class:`LMTrainer` holds one client's model (built once from an
:class:`~secure_xfl.training.lm.LMConfig`, identical on every party) and its
share of the data. Each round it loads the announced global trainable state,
trains ``local_steps`` steps and returns ``new − global`` (or, for the
``gradient`` rule, the mean gradient over the local steps, which the server
applies as w − η·g).

torchrun: every rank constructs the same ``LMTrainer``; rank 0 runs the client
service and calls :meth:`LMTrainer.train`, which first broadcasts the round to
the other ranks; the other ranks call :meth:`LMTrainer.follow` and train their
slice of the blocks in lock step (DDP averages the gradients). Rank 0 calls
:meth:`LMTrainer.close` at the end to release them. Untested beyond world size 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from secure_xfl.errors import TrainingError
from secure_xfl.training.data import (
    Blocks,
    default_documents,
    dirichlet_partition,
    dynamic_partition,
    fixed_partition,
    load_text,
    make_blocks,
    train_eval_split,
)
from secure_xfl.training.dp_sgd import DPSGDConfig, dp_local_train, dp_sgd_epsilon
from secure_xfl.training.lm import (
    LMConfig,
    build_model,
    evaluate,
    is_rank_zero,
    load_trainable,
    local_train,
    prepare,
    resolve_device,
    trainable_state,
    unwrap,
)
from secure_xfl.training.trainer import TrainResult

__all__ = ["LMTrainer", "SettingsError"]


class SettingsError(TrainingError):
    """The round's local-training settings are missing or out of range."""

    code = "training_settings"


def _setting(
    settings: Mapping[str, Any], key: str, kind: type, lo: float, default: Any = None
) -> Any:
    value = settings.get(key, default)
    if value is None:
        raise SettingsError(f"settings[{key!r}] is required")
    try:
        out = kind(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"settings[{key!r}] = {value!r} is not a {kind.__name__}") from exc
    if isinstance(value, bool) or not math.isfinite(out) or out < lo:
        raise SettingsError(f"settings[{key!r}] = {value!r} must be a finite number >= {lo}")
    return out


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def client_share(
    train: Blocks,
    client_name: str,
    clients: Sequence[str],
    partition: str,
    *,
    alpha: float = 0.5,
    throughputs: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Blocks:
    """``client_name``'s blocks of ``train`` under a deterministic partition every party
    computes alike (Dirichlet labels are each block's source document)."""
    if partition == "fixed":
        parts = fixed_partition(len(train), clients, seed=seed)
    elif partition == "dirichlet":
        parts = dirichlet_partition(train.labels, clients, alpha, seed)
    elif partition == "dynamic":
        rates = throughputs or dict.fromkeys(clients, 1.0)
        parts = dynamic_partition(len(train), rates, seed=seed)
    else:
        raise TrainingError(f"unknown partition {partition!r}")
    if client_name not in parts:
        raise TrainingError(f"{client_name!r} has no share in the partition")
    return train.subset(parts[client_name])


class LMTrainer:
    """Local causal-LM training for one client (implements the ``Trainer`` protocol)."""

    def __init__(
        self,
        cfg: LMConfig,
        train_blocks: Blocks,
        eval_blocks: Blocks | None = None,
        *,
        name: str = "client",
        device: str | torch.device = "auto",
        seed: int = 0,
        slow_factor: float = 0.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        progress: bool | None = None,
        eval_max_blocks: int | None = 1024,
    ) -> None:
        """``slow_factor`` s: after computing for t seconds, sleep s·t (heterogeneous clouds)."""
        if len(train_blocks) == 0:
            raise TrainingError(f"client {name!r} has no training blocks")
        if train_blocks.block_size != cfg.block_size:
            raise TrainingError(
                f"blocks of {train_blocks.block_size} tokens, model context {cfg.block_size}"
            )
        if slow_factor < 0 or not math.isfinite(slow_factor):
            raise TrainingError("slow_factor must be finite and >= 0")
        self.cfg = cfg
        self.name = name
        self.seed = seed
        self.slow_factor = slow_factor
        self.optimizer: Literal["adamw", "sgd"] = optimizer
        self.progress = progress
        self.eval_max_blocks = eval_max_blocks
        self.device = resolve_device(device)
        self.model = prepare(build_model(cfg), self.device)
        self.eval_blocks = eval_blocks
        self.set_blocks(train_blocks)
        #: (σ, sample rate, steps) of every DP-SGD round so far, for the record-level ε.
        self.dp_history: list[tuple[float, float, int]] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(
        cls,
        client_name: str,
        *,
        clients: Sequence[str],
        partition: Literal["fixed", "dirichlet", "dynamic"] = "fixed",
        alpha: float = 0.5,
        throughputs: Mapping[str, float] | None = None,
        text: str | Path | Sequence[str | Path] | None = None,
        max_bytes: int = 1_000_000,
        eval_fraction: float = 0.1,
        partition_seed: int = 0,
        lm: LMConfig | None = None,
        **kwargs: Any,
    ) -> LMTrainer:
        """A client of a demo federation: same corpus and split everywhere, this client's share.

        Every party computes the identical partition (deterministic) and keeps
        only its own. ``text``: local files or a hub id (default: the offline
        stdlib corpus). Dirichlet uses each block's source document as label.
        The held-out split is the same for all clients (the aggregator's eval set).
        In a real deployment each cloud passes its own blocks to ``__init__``.
        """
        if client_name not in clients:
            raise TrainingError(f"{client_name!r} is not among the clients {list(clients)}")
        cfg = lm or LMConfig()
        docs = (
            default_documents(max_bytes) if text is None else load_text(text, max_bytes=max_bytes)
        )
        train, held = train_eval_split(make_blocks(docs, cfg.block_size), eval_fraction)
        own = client_share(
            train,
            client_name,
            clients,
            partition,
            alpha=alpha,
            throughputs=throughputs,
            seed=partition_seed,
        )
        return cls(cfg, own, held, name=client_name, **kwargs)

    def set_blocks(self, blocks: Blocks) -> None:
        """Replace this client's training blocks (e.g. after :func:`rebalance`)."""
        if len(blocks) == 0:
            raise TrainingError(f"client {self.name!r} has no training blocks")
        self.all_blocks = blocks
        if _dist():
            # Each rank trains a disjoint slice; DDP averages their gradients.
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
            blocks = blocks.subset(np.arange(r, len(blocks), w))
        self.blocks = blocks

    def records(self, settings: Mapping[str, Any] | None = None) -> int:
        """Training records (blocks) DP-SGD samples from: its rate is batch / records."""
        return len(self.blocks)

    def initial_state(self) -> dict[str, np.ndarray]:
        """The trainable state of the freshly built model (round 0's global model)."""
        return trainable_state(build_model(self.cfg))

    # ------------------------------------------------------------------ Trainer protocol

    def train(
        self, model: dict[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        """One round of local training from the global ``model``."""
        if _dist() and torch.distributed.get_world_size() > 1 and is_rank_zero():
            torch.distributed.broadcast_object_list([(model, round, dict(settings))], src=0)
        return self._train(model, round, settings)

    def follow(self) -> None:
        """Non-zero ranks: train every round rank 0 broadcasts, until :meth:`close`."""
        while True:
            box: list[Any] = [None]
            torch.distributed.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            model, rnd, settings = box[0]
            self._train(model, rnd, settings)

    def close(self) -> None:
        """Rank 0: release the followers."""
        if _dist() and torch.distributed.get_world_size() > 1 and is_rank_zero():
            torch.distributed.broadcast_object_list([None], src=0)

    def _train(
        self, model: Mapping[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        rule = str(settings.get("rule", "fedavg"))
        steps = _setting(settings, "local_steps", int, 1)
        lr = _setting(settings, "local_lr", float, 1e-12)
        batch = _setting(settings, "batch_size", int, 1)
        mu = _setting(settings, "fedprox_mu", float, 0.0, default=0.0)
        dp = DPSGDConfig.from_settings(settings.get("dp_sgd"))
        global_state = {k: np.asarray(v, dtype=np.float32) for k, v in model.items()}
        load_trainable(self.model, global_state)
        # Per (seed, client, round) stream: reruns reproduce, clients differ.
        rng = np.random.default_rng([self.seed, round, *self.name.encode()])
        grads: dict[str, np.ndarray] | None = {} if rule == "gradient" else None
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        if dp is not None:
            loss, seen, q = dp_local_train(
                self.model, self.blocks, dp=dp, steps=steps, lr=lr, batch_size=batch,
                fedprox_mu=mu, global_state=global_state, rng=rng, optimizer=self.optimizer,
                grad_out=grads, progress=self.progress,
            )  # fmt: skip
            signed_q = (settings.get("dp_sgd") or {}).get("sample_rate")
            if signed_q is not None and not math.isclose(q, float(signed_q), rel_tol=1e-12):
                # The client signs (σ_r, q, steps) before training; running another q
                # would make the signed claim false.
                raise TrainingError(f"DP-SGD ran at q={q:g}, not the accounted q={signed_q:g}")
            self.dp_history.append((dp.noise_multiplier, q, steps))
            metrics["dp_sample_rate"] = q
            if dp.noise_multiplier > 0:
                metrics["dp_sgd_epsilon"] = dp_sgd_epsilon(self.dp_history, dp.delta)
        else:
            loss, seen = local_train(
                self.model, self.blocks, steps=steps, lr=lr, batch_size=batch, fedprox_mu=mu,
                global_state=global_state, rng=rng, optimizer=self.optimizer, grad_out=grads,
                progress=self.progress,
            )  # fmt: skip
        compute = time.perf_counter() - start
        if self.slow_factor > 0:
            time.sleep(self.slow_factor * compute)
        elapsed = time.perf_counter() - start
        if _dist() and torch.distributed.get_world_size() > 1:
            stats = torch.tensor(
                [loss * seen, float(seen)], dtype=torch.float64, device=self.device
            )
            torch.distributed.all_reduce(stats)
            loss, seen = float(stats[0] / stats[1]), int(stats[1])
        if grads is not None:
            update = grads
        else:
            new = trainable_state(self.model)
            update = {k: new[k] - global_state[k] for k in new}
        metrics.update(
            throughput=seen / elapsed if elapsed > 0 else float("inf"),
            seconds=elapsed,
            compute_seconds=compute,
            steps=float(steps),
        )
        return TrainResult(update=update, num_samples=seen, loss=loss, metrics=metrics)

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, state: Mapping[str, np.ndarray] | None = None, blocks: Blocks | None = None
    ) -> dict[str, float]:
        """Held-out loss / perplexity / accuracy of ``state`` (default: the current model)."""
        target = blocks or self.eval_blocks
        if target is None:
            raise TrainingError("no evaluation blocks were given to this trainer")
        if state is not None:
            load_trainable(self.model, state)
        return evaluate(unwrap(self.model), target, max_blocks=self.eval_max_blocks)
