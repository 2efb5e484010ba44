"""Empirical privacy audit, part 1: gradient inversion (Deep Leakage from Gradients).

DLG (Zhu, Liu & Han, NeurIPS 2019) reconstructs a training example from the
gradient it produced: it optimises a dummy input (and a dummy label, or the label
iDLG reads off the last layer's bias gradient) until the dummy's gradient matches
the observed one. On one example and a small network it recovers the input almost
exactly, which is why an individual update must never be seen in the clear.

This module runs the same attack on what each party of secure-xfl actually holds:

* a **plaintext single-client update** (what an unprotected federation leaks);
* the **aggregator's view** — serialised CKKS ciphertext chunks, which it cannot
  decrypt: the attacker's best move is to read the ciphertext words as numbers;
* the **key holder's release** — the DP-noised weighted average of at least
  ``min_clients`` clients, the only plaintext any party ever sees.

:func:`guess_baseline` gives what blind guessing from the data prior scores, so a
reconstruction can be judged against "no information at all".
Canary exposure (the Secret Sharer) is in :mod:`secure_xfl.experiments.canary`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "Reconstruction",
    "ciphertext_as_vector",
    "cosine",
    "dlg",
    "flat_gradient",
    "guess_baseline",
    "infer_label",
    "make_mlp",
    "score",
]


def make_mlp(d_in: int = 32, hidden: int = 32, classes: int = 4, seed: int = 0) -> nn.Module:
    """The small victim network: Linear → Sigmoid → Linear, float64, seeded.

    Sigmoid (twice differentiable, as in the DLG paper) keeps the
    gradient-matching objective smooth so the attack is at its strongest.
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Sigmoid(), nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model.double()


def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def flat_gradient(model: nn.Module, x: np.ndarray, label: int) -> np.ndarray:
    """Cross-entropy gradient of one example, flattened in ``parameters()`` order."""
    xt = torch.as_tensor(x, dtype=torch.float64).reshape(1, -1)
    out = model(xt)
    classes = out.shape[-1]
    target = torch.nn.functional.one_hot(torch.tensor([label]), classes).double()
    grads = torch.autograd.grad(_soft_ce(out, target), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).numpy().copy()


def infer_label(model: nn.Module, grad: np.ndarray) -> int:
    """iDLG: with cross-entropy on one example, only the true class's output-bias
    gradient (softmax − 1) is negative."""
    classes = list(model.parameters())[-1].shape[0]
    return int(np.argmin(grad[-classes:]))


def dlg(
    model: nn.Module,
    target_grad: np.ndarray,
    d_in: int,
    *,
    label: int | None = None,
    iterations: int = 200,
    restarts: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Reconstruct one input whose gradient matches ``target_grad`` (L-BFGS, as in DLG).

    ``label`` defaults to the iDLG inference from ``target_grad``. With
    ``restarts`` > 1 the attack starts from several random dummies and keeps the
    one whose gradient matches best (the attacker cannot see the true input).
    """
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    if target_grad.shape != (numel,):
        raise ValueError(f"target gradient has shape {target_grad.shape}, model has {numel}")
    target = torch.as_tensor(target_grad, dtype=torch.float64)
    classes = params[-1].shape[0]
    lab = infer_label(model, target_grad) if label is None else label
    onehot = torch.nn.functional.one_hot(torch.tensor([lab]), classes).double()
    gen = torch.Generator().manual_seed(seed)

    def mismatch(dummy: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(_soft_ce(model(dummy), onehot), params, create_graph=True)
        return ((torch.cat([g.reshape(-1) for g in grads]) - target) ** 2).sum()

    best, best_loss = None, math.inf
    for _ in range(max(1, restarts)):
        dummy = torch.randn(1, d_in, generator=gen, dtype=torch.float64).requires_grad_(True)
        opt = torch.optim.LBFGS(
            [dummy], lr=1.0, max_iter=iterations, history_size=50, line_search_fn="strong_wolfe"
        )

        def closure(dummy: torch.Tensor = dummy, opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = mismatch(dummy)
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        final = float(mismatch(dummy).detach())
        if math.isfinite(final) and final < best_loss and torch.isfinite(dummy).all():
            best, best_loss = dummy.detach().reshape(-1).numpy().copy(), final
    if best is None:  # every start diverged: the attacker is left with a guess
        best = torch.randn(d_in, generator=gen, dtype=torch.float64).numpy()
    return best


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity (0 for a zero vector)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return 0.0 if na == 0 or nb == 0 else float(np.dot(a, b) / (na * nb))


@dataclass(frozen=True)
class Reconstruction:
    """How close a reconstruction came to the closest of the private examples."""

    cosine: float
    """Best cosine similarity to any private example (1 = exact direction)."""
    rel_error: float
    """‖x̂ − x‖ / ‖x‖ for that example (0 = exact; ≈ √2 for an independent guess)."""
    index: int
    """Which private example was closest."""


def score(x_hat: np.ndarray, targets: Sequence[np.ndarray]) -> Reconstruction:
    """Score ``x_hat`` against every private example and keep the best match."""
    sims = [cosine(x_hat, t) for t in targets]
    i = int(np.argmax(sims))
    err = float(np.linalg.norm(x_hat - targets[i]) / np.linalg.norm(targets[i]))
    return Reconstruction(cosine=sims[i], rel_error=err, index=i)


def guess_baseline(
    targets: Sequence[np.ndarray], trials: int = 2000, seed: int = 1
) -> tuple[float, float, float]:
    """Best-match cosine of blind guesses from the prior N(0, I): (mean, std, 99th pct)."""
    rng = np.random.default_rng(seed)
    d = targets[0].shape[0]
    best = [score(np.asarray(rng.standard_normal(d)), targets).cosine for _ in range(trials)]
    return float(np.mean(best)), float(np.std(best)), float(np.quantile(best, 0.99))


def ciphertext_as_vector(chunks: Sequence[bytes], numel: int, norm: float) -> np.ndarray:
    """The aggregator's best plaintext guess from ciphertext bytes alone.

    It cannot decrypt, so it reads the serialised chunks as little-endian 64-bit
    words, maps them to [−1, 1) and rescales the first ``numel`` to the public clip
    norm (the only magnitude it knows).
    """
    raw = b"".join(chunks)
    words = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<u8")
    if words.size < numel:
        words = np.resize(words, numel)
    vec = words[:numel].astype(np.float64) / 2.0**63 - 1.0
    n = float(np.linalg.norm(vec))
    return vec * (norm / n) if n > 0 and math.isfinite(n) else vec
