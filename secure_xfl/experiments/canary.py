"""Empirical privacy audit, part 2: canary exposure (Carlini et al., "The Secret Sharer").

A random *canary* — ``"<prefix><secret>"`` with a secret drawn uniformly from R
candidates — is planted in one client's training data. After training, every
candidate is ranked by the model's log-perplexity given the prefix; the canary's
rank r gives its **exposure** ``log2 R − log2 r`` bits. A model that memorised the
canary ranks it first (exposure = log2 R); a model that learned nothing about it
ranks it uniformly at random (expected exposure ≈ 1.4 bits, rarely more than a few).

:func:`federated_canary_run` trains a small GPT-2 (+LoRA, from
:mod:`secure_xfl.training.lm`) through the real pipeline, in one process: each
client's :class:`~secure_xfl.training.lm_trainer.LMTrainer` update is clipped and
noised (when DP is on), CKKS-encrypted and signed by
:func:`~secure_xfl.crypto.protect.protect_vector`, summed on ciphertexts by an
:class:`~secure_xfl.crypto.aggregate.Accumulator`, and decrypted under policy by a
:class:`~secure_xfl.crypto.keyholder.KeyHolder` — the only plaintext the model is
ever built from.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from torch import nn

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import flatten, layout_of, unflatten
from secure_xfl.crypto.context import generate_context, get_preset, load_context
from secure_xfl.crypto.context import public_context_bytes as _public_bytes
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.privacy.accountant import epsilon_for
from secure_xfl.privacy.dp import DPConfig
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.training.data import Blocks, ByteTokenizer, default_documents, make_blocks
from secure_xfl.training.lm import LMConfig, build_model, evaluate, load_trainable

__all__ = [
    "Canary",
    "CanaryReport",
    "Exposure",
    "exposure",
    "federated_canary_run",
    "insert_canary",
    "make_canary",
]


@dataclass(frozen=True)
class Canary:
    """``prefix + secret + suffix``; the secret is one of ``len(alphabet)**len(secret)``."""

    prefix: str
    """Context the model is prompted with."""
    secret: str
    """The random part the model must not memorise."""
    alphabet: str = "0123456789"
    """Characters the secret is drawn from."""
    suffix: str = ".\n"
    """Text after the secret."""

    @property
    def text(self) -> str:
        """The inserted sentence."""
        return self.prefix + self.secret + self.suffix

    @property
    def space(self) -> int:
        """R: the number of possible secrets."""
        return int(len(self.alphabet) ** len(self.secret))

    def candidates(self) -> list[str]:
        """Every possible secret (the canary's among them)."""
        return ["".join(t) for t in itertools.product(self.alphabet, repeat=len(self.secret))]


def make_canary(seed: int, length: int = 4, prefix: str = "my secret pin is ") -> Canary:
    """A canary with a uniformly random ``length``-digit secret."""
    rng = np.random.default_rng(seed)
    return Canary(prefix=prefix, secret="".join(str(d) for d in rng.integers(0, 10, length)))


def insert_canary(blocks: Blocks, canary: Canary, every: int, tok: ByteTokenizer) -> Blocks:
    """Start every ``every``-th block with BOS + the canary (the rest of it is corpus)."""
    ids = np.asarray(tok.encode(canary.text, bos=True), dtype=blocks.tokens.dtype)
    if ids.size >= blocks.block_size:
        raise ValueError("canary does not fit in a block")
    tokens = blocks.tokens.copy()
    tokens[::every, : ids.size] = ids
    return Blocks(tokens, blocks.labels, blocks.label_names)


@torch.no_grad()
def _log_perplexities(
    model: nn.Module, canary: Canary, tok: ByteTokenizer, batch: int = 2000
) -> np.ndarray:
    """−log p(secret | BOS + prefix) for every candidate secret, in nats."""
    model.eval()
    prefix = tok.encode(canary.prefix, bos=True)
    cands = canary.candidates()
    seqs = torch.tensor([prefix + tok.encode(c) for c in cands], dtype=torch.long)
    start = len(prefix)
    out = np.empty(len(cands))
    for i in range(0, len(cands), batch):
        x = seqs[i : i + batch]
        logp = torch.log_softmax(model(input_ids=x).logits.double(), dim=-1)
        tgt = x[:, start:]
        picked = logp[:, start - 1 : -1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        out[i : i + batch] = (-picked.sum(-1)).numpy()
    return out


@dataclass(frozen=True)
class Exposure:
    """Where the canary ranks among all R candidates."""

    rank: int
    """1 + number of candidates strictly more likely than the canary."""
    candidates: int
    """R."""

    @property
    def bits(self) -> float:
        """Exposure ``log2 R − log2 rank``."""
        return math.log2(self.candidates) - math.log2(self.rank)


def exposure(model: nn.Module, canary: Canary, tok: ByteTokenizer | None = None) -> Exposure:
    """The canary's exposure under ``model``."""
    ppl = _log_perplexities(model, canary, tok or ByteTokenizer())
    mine = ppl[canary.candidates().index(canary.secret)]
    return Exposure(rank=int((ppl < mine).sum()) + 1, candidates=canary.space)


@dataclass(frozen=True)
class CanaryReport:
    """Outcome of one federated training run with a planted canary."""

    exposure: Exposure
    """The canary's exposure in the final global model."""
    eval_loss: float
    """Held-out loss of the final global model (utility)."""
    initial_loss: float
    """Held-out loss of the initial model."""
    noise_multiplier: float
    """σ of client-level DP (0 = off)."""
    epsilon: float
    """Client-level ε after all rounds at δ (inf without DP)."""
    rounds: int
    """Rounds run."""
    seconds: float
    """Wall time."""


def federated_canary_run(
    canary: Canary,
    *,
    dp: DPConfig | None,
    clients: int = 3,
    rounds: int = 6,
    local_steps: int = 15,
    lr: float = 1e-2,
    batch_size: int = 8,
    every: int = 4,
    corpus_bytes: int = 120_000,
    lm: LMConfig | None = None,
    preset: str = "xfl-default",
    seed: int = 0,
) -> CanaryReport:
    """Train through protect → encrypted sum → policy decryption; measure the canary.

    Client 0 holds the canary in every ``every``-th of its blocks. With ``dp``
    each update is clipped to C and noised with σC/√K (K = ``dp.min_clients``).
    """
    from secure_xfl.training.lm_trainer import LMTrainer  # heavy: transformers, peft

    start = time.monotonic()
    tok = ByteTokenizer()
    cfg = lm or LMConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, seed=seed)
    blocks = make_blocks(default_documents(corpus_bytes), cfg.block_size, tok)
    held = blocks.subset(np.arange(len(blocks))[9::10])
    train = blocks.subset(np.setdiff1d(np.arange(len(blocks)), np.arange(9, len(blocks), 10)))
    names = [f"client{i}" for i in range(clients)]
    shares = np.array_split(np.random.default_rng(seed).permutation(len(train)), clients)
    parts = [train.subset(np.sort(s)) for s in shares]
    parts[0] = insert_canary(parts[0], canary, every, tok)
    trainers = [
        LMTrainer(cfg, part, held, name=n, device="cpu", seed=seed, progress=False)
        for n, part in zip(names, parts, strict=True)
    ]
    state = trainers[0].initial_state()
    layout = layout_of({k: torch.from_numpy(v) for k, v in state.items()})
    p = get_preset(preset)
    secret_ctx = generate_context(p)
    public_ctx = load_context(_public_bytes(secret_ctx), require_secret=False)
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in names}
    min_clients = dp.min_clients if dp is not None else clients
    sigma = dp.noise_multiplier if dp is not None else 0.0
    settings = {"rule": "fedavg", "local_steps": local_steps, "local_lr": lr}
    settings["batch_size"] = batch_size
    cap = float(sum(len(part) for part in parts))
    rng = np.random.default_rng(seed + 1)
    model = build_model(cfg)
    initial_loss = evaluate(model, held, max_blocks=256)["loss"]
    with tempfile.TemporaryDirectory() as state_dir:
        holder = KeyHolder(
            ctx=secret_ctx,
            preset=p,
            policy=KeyHolderPolicy(
                run="canary", min_clients=min_clients, dp=None if dp is None else dp.spec()
            ),
            client_keys={n: k.public_key() for n, k in keys.items()},
            state_dir=Path(state_dir),
        )
        try:
            for r in range(rounds):
                acc = Accumulator(
                    ctx=public_ctx,
                    preset=p,
                    run="canary",
                    round=r,
                    layout_digest=layout.digest,
                    numel=layout.numel,
                    key_for=lambda n: keys[n].public_key(),
                    weighting="client",
                )
                for name, trainer in zip(names, trainers, strict=True):
                    res = trainer.train(state, r, settings)
                    upd = {k: torch.from_numpy(np.asarray(v)) for k, v in res.update.items()}
                    acc.add(
                        protect_vector(
                            flatten(upd, layout),
                            ctx=public_ctx,
                            preset=p,
                            layout=layout,
                            run="canary",
                            round=r,
                            client=name,
                            signing_key=keys[name],
                            weight=res.num_samples / cap,
                            weighting="client",
                            dp=dp,
                            rng=rng,
                        )
                    )
                average = holder.decrypt(acc.result()).vector
                flat = flatten({k: torch.from_numpy(v) for k, v in state.items()}, layout)
                new = unflatten(flat + average, layout)
                state = {k: v.numpy().astype(np.float32) for k, v in new.items()}
        finally:
            holder.close()
    load_trainable(model, state)
    eps = (
        epsilon_for(sigma, 1.0, rounds, dp.delta) if dp is not None and sigma > 0 else float("inf")
    )
    return CanaryReport(
        exposure=exposure(model, canary, tok),
        eval_loss=evaluate(model, held, max_blocks=256)["loss"],
        initial_loss=initial_loss,
        noise_multiplier=sigma,
        epsilon=eps,
        rounds=rounds,
        seconds=time.monotonic() - start,
    )
