"""Small causal language models: build, train locally, evaluate.

Every party must start from the *identical* model, and only the trainable part
travels (encrypted) between parties. :func:`build_model` therefore builds a
GPT-2 from a config under a fixed seed (or loads local weights) and wraps it
with LoRA through peft; :func:`trainable_state` / :func:`load_trainable` move
exactly the ``requires_grad`` tensors, named as in ``named_parameters()``.

Multi-GPU node (torchrun): start one process per GPU with
``torchrun --nproc-per-node=G your_client.py``; every rank builds the model,
:func:`prepare` wraps it in DistributedDataParallel (each rank trains on its
own slice of the blocks and gradients are averaged), and only the rank for
which :func:`is_rank_zero` is true talks to the aggregator — see
:class:`secure_xfl.training.lm_trainer.LMTrainer`, which broadcasts each
round's global model and settings from rank 0 to the others. Only world size 1
is exercised by the tests here (no multi-GPU machine is available to them).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secure_xfl.errors import TrainingError
from secure_xfl.training.data import Blocks, ByteTokenizer

__all__ = [
    "LMConfig",
    "ModelError",
    "build_model",
    "evaluate",
    "is_rank_zero",
    "load_trainable",
    "local_train",
    "num_trainable",
    "prepare",
    "resolve_device",
    "trainable_state",
    "unwrap",
]


class ModelError(TrainingError):
    """A model cannot be built, or a state does not fit it."""

    code = "model"


@dataclass(frozen=True)
class LMConfig:
    """A small GPT-2 and how it is fine-tuned; defaults train in seconds on 2 CPU cores."""

    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads per block."""
    n_embd: int = 64
    """Hidden width (must be divisible by ``n_head``)."""
    block_size: int = 64
    """Context length in tokens (also the data block length)."""
    vocab_size: int = ByteTokenizer.vocab_size
    """Token vocabulary (bytes + specials for the default tokenizer)."""
    dropout: float = 0.0
    """Residual / embedding / attention dropout (0: deterministic, fine for tiny models)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_targets: tuple[str, ...] | None = ("c_attn", "c_proj", "c_fc")
    """Module names LoRA adapts (GPT-2 names); ``None`` lets peft pick for the model type."""
    also_train: tuple[str, ...] = ("wte", "wpe", "ln_")
    """Base parameters left trainable under LoRA (substring of the name).

    A *random* frozen base gives LoRA nothing useful to adapt; training the
    (tied) token embedding / LM head and the layer norms is what makes the
    held-out loss fall within a few rounds. Set ``()`` for adapters only, as one
    would with a pretrained base."""
    full_finetune: bool = False
    """Train every parameter (no LoRA); updates are then the whole model."""
    seed: int = 0
    """Seed of the initial weights, so every party builds the identical model."""
    pretrained: str | None = None
    """Local directory of a saved causal LM to start from instead of a random GPT-2."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ModelError("n_embd must be divisible by n_head")
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size) < 1:
            raise ModelError("model sizes must be positive")
        if not self.full_finetune and self.lora_r < 1:
            raise ModelError("lora_r must be positive")


def _base_model(cfg: LMConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if cfg.pretrained is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(cfg.pretrained, local_files_only=True)  # type: ignore[no-any-return]
        except Exception as exc:  # OSError, ValueError, …: all mean "not loadable here"
            raise ModelError(f"cannot load a causal LM from {cfg.pretrained!r}: {exc}") from exc
    conf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=ByteTokenizer.BOS,
        eos_token_id=ByteTokenizer.EOS,
        pad_token_id=ByteTokenizer.PAD,
    )
    return GPT2LMHeadModel(conf)


def build_model(cfg: LMConfig) -> nn.Module:
    """The initial model of a run, identical on every party for the same ``cfg``.

    Weights (and LoRA's random A matrices) are drawn under ``cfg.seed`` inside a
    forked RNG, so the caller's global torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _base_model(cfg)
        if cfg.full_finetune:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets) if cfg.lora_targets else None,
                fan_in_fan_out=cfg.pretrained is None,  # GPT-2's Conv1D stores (in, out)
                task_type="CAUSAL_LM",
            )
            try:
                with warnings.catch_warnings():
                    # peft calls a transformers API deprecated in 5.x; not ours to fix.
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    model = get_peft_model(model, lora)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ModelError(f"LoRA does not fit this model: {exc}") from exc
            for name, p in model.named_parameters():
                if any(s in name for s in cfg.also_train):
                    p.requires_grad_(True)
    model.train()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (names without ``module.``)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(model, nn.parallel.DistributedDataParallel) and inner else model


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the trainable tensors as float32 arrays, by ``named_parameters()`` name."""
    return {
        name: p.detach().to("cpu", torch.float32).numpy().copy()
        for name, p in unwrap(model).named_parameters()
        if p.requires_grad
    }


def num_trainable(model: nn.Module) -> int:
    """Number of trainable scalars (what every update carries)."""
    return sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)


def load_trainable(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the trainable tensors with ``state``; names and shapes must match exactly."""
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ModelError(
            f"state does not match the model's trainable parameters: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = np.asarray(state[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ModelError(f"{name}: shape {value.shape} != model's {tuple(p.shape)}")
            if not np.isfinite(value).all():
                raise ModelError(f"{name}: non-finite values")
            p.copy_(torch.from_numpy(value).to(p.dtype))


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this rank's CUDA device when there is one, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.device("cuda", torch.distributed.get_rank() % torch.cuda.device_count())
        return torch.device("cuda")
    return torch.device("cpu")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_rank_zero() -> bool:
    """True in a plain process and on rank 0 of a torchrun job (the one that talks)."""
    return not _distributed() or torch.distributed.get_rank() == 0


def prepare(model: nn.Module, device: str | torch.device = "auto") -> nn.Module:
    """Move ``model`` to ``device``; wrap in DDP when a process group of size > 1 exists."""
    dev = resolve_device(device)
    model = model.to(dev)
    if _distributed() and torch.distributed.get_world_size() > 1:
        ids = [dev.index] if dev.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- training


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch, labels=batch)
    return out.loss  # type: ignore[no-any-return]


def local_train(
    model: nn.Module,
    blocks: Blocks,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    fedprox_mu: float = 0.0,
    global_state: Mapping[str, np.ndarray] | None = None,
    device: str | torch.device | None = None,
    rng: np.random.Generator | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    grad_out: dict[str, np.ndarray] | None = None,
    progress: bool | None = None,
) -> tuple[float, int]:
    """Train the trainable parameters for ``steps`` mini-batches; (mean loss, samples seen).

    Batches are drawn without replacement from a fresh ``rng`` permutation,
    reshuffling when exhausted. With ``fedprox_mu`` > 0 the FedProx term
    μ/2·‖w − w_global‖² is added (``global_state`` is the anchor; default: the
    weights at entry). The reported loss is the language-model loss only.
    When ``grad_out`` is given it is filled with the mean gradient of the local
    objective over the steps (gradient aggregation). ``progress``: tqdm bar
    (default: only when stderr is a terminal). ``device`` None: where the model is.
    """
    if steps < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise TrainingError("steps, batch_size and lr must be positive")
    if fedprox_mu < 0 or not math.isfinite(fedprox_mu):
        raise TrainingError("fedprox_mu must be finite and >= 0")
    if len(blocks) == 0:
        raise TrainingError("no training blocks")
    if device is not None:
        model.to(resolve_device(device))
    dev = _model_device(model)
    rng = rng or np.random.default_rng(0)
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=lr)
    )
    anchor: list[torch.Tensor] = []
    if fedprox_mu > 0:
        if global_state is None:
            anchor = [p.detach().clone() for p in params]
        else:
            anchor = [torch.as_tensor(global_state[n], device=dev, dtype=p.dtype) for n, p in named]
    grad_sum = [torch.zeros_like(p) for p in params] if grad_out is not None else []
    model.train()
    tokens = blocks.tokens
    order = rng.permutation(len(blocks))
    pos, total_loss, seen = 0, 0.0, 0
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(steps), desc="local", unit="step", disable=not show or not is_rank_zero())
    for _ in bar:
        if pos + batch_size > len(order) and pos > 0:
            order, pos = rng.permutation(len(blocks)), 0
        idx = order[pos : pos + batch_size]
        pos += len(idx)
        batch = torch.from_numpy(tokens[idx].astype(np.int64)).to(dev)
        loss = _lm_loss(model, batch)
        objective = loss
        if anchor:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            objective = loss + 0.5 * fedprox_mu * prox
        opt.zero_grad(set_to_none=True)
        objective.backward()  # type: ignore[no-untyped-call]
        if grad_sum:
            for g, p in zip(grad_sum, params, strict=True):
                if p.grad is not None:
                    g.add_(p.grad)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError("training diverged (non-finite loss); lower the learning rate")
        total_loss += value * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{value:.3f}")
    if grad_out is not None:
        grad_out.clear()
        grad_out.update(
            {
                n: (g / steps).to("cpu", torch.float32).numpy()
                for (n, _), g in zip(named, grad_sum, strict=True)
            }
        )
    return total_loss / seen, seen


@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: Blocks,
    device: str | torch.device | None = None,
    *,
    batch_size: int = 64,
    max_blocks: int | None = None,
) -> dict[str, float]:
    """Held-out ``loss`` (mean per predicted token), ``perplexity`` and next-token ``accuracy``."""
    if len(blocks) == 0:
        raise TrainingError("no evaluation blocks")
    if device is not None:
        model.to(resolve_device(device))
    dev = _model_device(model)
    was_training = model.training
    model.eval()
    n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for start in range(0, n, batch_size):
            batch = torch.from_numpy(
                blocks.tokens[start : min(n, start + batch_size)].astype(np.int64)
            )
            batch = batch.to(dev)
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            loss_sum += float(
                nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    finally:
        model.train(was_training)
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / count}
