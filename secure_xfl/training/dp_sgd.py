"""Record-level DP-SGD inside one client, through Opacus.

Client-level DP (clip + noise of the whole update, :mod:`secure_xfl.privacy.dp`)
protects a silo's participation; DP-SGD additionally bounds what the update
reveals about any single training block. Per-sample gradients come from
Opacus' ``GradSampleModule`` hooks, clipping and noise from its
``DPOptimizer``, the ε from its RDP accountant; batches are Poisson-sampled so
the accountant's assumptions hold.

Works for the default GPT-2 + LoRA model: the trainable modules are LoRA
``Linear`` layers, ``Embedding`` (the tied token embedding / LM head) and
``LayerNorm``, all of which Opacus supports; GPT-2's own ``Conv1D`` is frozen.
Position ids are passed explicitly per sample, because the broadcast default
(batch dimension 1) would give the position embedding a single "sample".
Not supported under DistributedDataParallel (use one process per client).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.errors import TrainingError
from secure_xfl.privacy.accountant import epsilon
from secure_xfl.training.data import Blocks

__all__ = ["DPSGDConfig", "DPSGDError", "dp_local_train", "dp_sgd_epsilon"]


class DPSGDError(TrainingError):
    """DP-SGD settings that are invalid or cannot be honoured for this model."""

    code = "dp_sgd"


@dataclass(frozen=True)
class DPSGDConfig:
    """Record-level DP-SGD settings (announced by the aggregator as ``settings["dp_sgd"]``)."""

    noise_multiplier: float
    """σ: Gaussian noise std as a multiple of ``max_grad_norm`` per step."""
    max_grad_norm: float
    """Per-sample gradient clipping bound C."""
    delta: float = DEFAULT_DELTA
    """δ at which the record-level ε is reported."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise DPSGDError("dp_sgd.noise_multiplier must be finite and >= 0")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise DPSGDError("dp_sgd.max_grad_norm must be finite and > 0")
        if not 0 < self.delta < 1:
            raise DPSGDError("dp_sgd.delta must be in (0, 1)")

    @classmethod
    def from_settings(cls, value: Any) -> DPSGDConfig | None:
        """Parse ``settings["dp_sgd"]``; None / empty / ``False`` means off."""
        if not value:
            return None
        if not isinstance(value, Mapping):
            raise DPSGDError("settings['dp_sgd'] must be a mapping")
        try:
            return cls(
                noise_multiplier=float(value["noise_multiplier"]),
                max_grad_norm=float(value["max_grad_norm"]),
                delta=float(value.get("delta", DEFAULT_DELTA)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DPSGDError(f"bad dp_sgd settings {dict(value)!r}: {exc}") from exc


def dp_sgd_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε spent by the DP-SGD steps in ``history`` ((σ, sample rate, steps) triples), with
    the same PLD arithmetic as the silo's own account and the audit."""
    return epsilon(history, delta, "pld")


def dp_local_train(
    model: nn.Module,
    blocks: Blocks,
    *,
    dp: DPSGDConfig,
    steps: int,
    lr: float,
    batch_size: int,
    fedprox_mu: float = 0.0,
    global_state: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    grad_out: dict[str, np.ndarray] | None = None,
    progress: bool | None = None,
) -> tuple[float, int, float]:
    """Like :func:`secure_xfl.training.lm.local_train`, with DP-SGD; returns (loss, samples, q).

    Each step includes every block independently with probability
    q = batch_size / len(blocks) (Poisson sampling); the caller accounts
    ``steps`` steps at (σ, q). The FedProx gradient μ(w − w_global) depends on
    no record, so it is added after clipping and noise.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DPSGDError("DP-SGD is not supported under DistributedDataParallel")
    if steps < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise TrainingError("steps, batch_size and lr must be positive")
    n = len(blocks)
    if n == 0:
        raise TrainingError("no training blocks")
    rng = rng or np.random.default_rng(0)
    q = min(1.0, batch_size / n)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    dev = params[0].device
    base: torch.optim.Optimizer = (
        torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=lr)
    )
    try:
        gsm = GradSampleModule(model)
    except Exception as exc:  # opacus raises NotImplementedError / ValueError for bad modules
        raise DPSGDError(f"Opacus cannot compute per-sample gradients here: {exc}") from exc
    opt = DPOptimizer(
        base,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=max(1, round(q * n)),
    )
    anchor: list[torch.Tensor] = []
    if fedprox_mu > 0:
        anchor = (
            [p.detach().clone() for p in params]
            if global_state is None
            else [torch.as_tensor(global_state[k], device=dev, dtype=p.dtype) for k, p in named]
        )
    grad_sum = [torch.zeros_like(p) for p in params] if grad_out is not None else []
    show = sys.stderr.isatty() if progress is None else progress
    total_loss, seen = 0.0, 0
    model.train()
    try:
        for _ in tqdm(range(steps), desc="local dp-sgd", unit="step", disable=not show):
            idx = np.flatnonzero(rng.random(n) < q)
            opt.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # An empty Poisson batch still costs a step of privacy budget in the
                # accountant's model; releasing nothing here only helps.
                continue
            batch = torch.from_numpy(blocks.tokens[idx].astype(np.int64)).to(dev)
            pos = torch.arange(batch.shape[1], device=dev).expand(batch.shape[0], -1)
            loss = gsm(input_ids=batch, labels=batch, position_ids=pos).loss
            with warnings.catch_warnings():
                # Opacus' full backward hooks on the first trainable module see no
                # input that requires grad (token ids); torch warns, harmlessly.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            if opt.pre_step():  # clip per sample, sum, add noise, scale
                if anchor:
                    with torch.no_grad():
                        for p, a in zip(params, anchor, strict=True):
                            p.grad.add_(p.detach() - a, alpha=fedprox_mu)  # type: ignore[union-attr]
                for g, p in zip(grad_sum, params, strict=False):  # grad_sum may be []
                    if p.grad is not None:
                        g.add_(p.grad)
                opt.original_optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError("training diverged (non-finite loss); lower the learning rate")
            total_loss += value * len(idx)
            seen += len(idx)
    finally:
        gsm._close()  # removes the hooks and grad_sample attributes from the model
    if grad_out is not None:
        grad_out.clear()
        for (name, _), g in zip(named, grad_sum, strict=True):
            grad_out[name] = (g / steps).to("cpu", torch.float32).numpy()
    return (total_loss / seen if seen else float("nan")), seen, q
