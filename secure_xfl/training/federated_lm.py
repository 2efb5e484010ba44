"""Language-model pieces the services plug in: the initial model, the aggregator's evaluator
and a client trainer that follows the partitioning the aggregator announces.

Every party builds the identical small GPT-2 from :class:`LMConfig` (seeded), so the
global model is only ever exchanged as its trainable part.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_xfl.training.data import (
    Blocks,
    default_documents,
    load_text,
    make_blocks,
    train_eval_split,
)
from secure_xfl.training.lm import LMConfig, build_model, evaluate, load_trainable, trainable_state
from secure_xfl.training.lm_trainer import LMTrainer, client_share
from secure_xfl.training.trainer import TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Where the training text comes from and how it is split among clients."""

    text: str | None = None
    """Local text file/folder or hub dataset id; None = the offline stdlib corpus."""
    max_bytes: int = 1_000_000
    """Text read at most (keeps demo start-up fast)."""
    partition: str = "fixed"
    """``fixed`` (equal shares), ``dirichlet`` (non-IID by source), ``dynamic`` (throughput)."""
    alpha: float = 0.5
    """Dirichlet concentration (smaller = more skewed)."""
    eval_blocks: int = 256
    """Held-out blocks the aggregator evaluates each global model on."""


def initial_model(cfg: LMConfig | None = None) -> dict[str, np.ndarray]:
    """The trainable part of the freshly built (seeded) model: round 0's global model."""
    return trainable_state(build_model(cfg or LMConfig()))


class LMEvaluator:
    """Held-out loss, perplexity and next-token accuracy of a global model (aggregator side).

    The held-out split is carved from the public corpus, never from a client's data.
    """

    def __init__(self, cfg: LMConfig | None = None, data: DataSpec | None = None) -> None:
        self.cfg = cfg or LMConfig()
        spec = data or DataSpec()
        docs = (
            default_documents(spec.max_bytes)
            if spec.text is None
            else load_text(spec.text, max_bytes=spec.max_bytes)
        )
        _, held = train_eval_split(make_blocks(docs, self.cfg.block_size))
        n = min(len(held), spec.eval_blocks)
        self.blocks = held.subset(np.linspace(0, len(held) - 1, n).astype(int).tolist())
        self.model = build_model(self.cfg)

    def __call__(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
        load_trainable(self.model, dict(state))
        return evaluate(self.model, self.blocks)


def _leader() -> bool:
    """Rank 0 of a torchrun job with more than one process."""
    import torch.distributed as dist

    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and dist.get_rank() == 0
    )


class FederatedLMTrainer:
    """A client trainer whose data share follows the aggregator's announcements.

    The round settings carry the enrolled ``clients`` and, for dynamic
    partitioning, each client's last measured ``throughputs``; every client
    derives the same deterministic partition and keeps its own share, so shares
    move toward faster clouds between rounds.
    """

    def __init__(
        self,
        name: str,
        *,
        data: DataSpec | None = None,
        cfg: LMConfig | None = None,
        slow_factor: float = 0.0,
        device: str = "auto",
    ) -> None:
        self.name = name
        self.data = data or DataSpec()
        self.cfg = cfg or LMConfig()
        self.slow_factor = slow_factor
        self.device = device
        self._inner: LMTrainer | None = None
        self._key: tuple[Any, ...] | None = None
        self._split: tuple[Blocks, Blocks] | None = None

    def _corpus(self) -> tuple[Blocks, Blocks]:
        """(train, held-out) blocks of the shared corpus, read and tokenised once."""
        if self._split is None:
            spec = self.data
            docs = (
                default_documents(spec.max_bytes)
                if spec.text is None
                else load_text(spec.text, max_bytes=spec.max_bytes)
            )
            self._split = train_eval_split(make_blocks(docs, self.cfg.block_size))
        return self._split

    def _trainer(self, settings: Mapping[str, Any]) -> LMTrainer:
        clients = tuple(sorted(str(c) for c in settings.get("clients") or (self.name,)))
        rates = settings.get("throughputs") or {}
        partition = self.data.partition
        throughputs = (
            {c: float(rates[c]) for c in clients}
            if partition == "dynamic" and set(rates) >= set(clients)
            else None
        )
        key = (clients, tuple(sorted((throughputs or {}).items())))
        if self._inner is not None and key == self._key:
            return self._inner
        train, held = self._corpus()
        own = client_share(
            train, self.name, clients, partition, alpha=self.data.alpha, throughputs=throughputs
        )
        if self._inner is None:
            self._inner = LMTrainer(
                self.cfg,
                own,
                held,
                name=self.name,
                slow_factor=self.slow_factor,
                device=self.device,
            )
        else:
            # Only the share moves; the model and the corpus are built once.
            self._inner.set_blocks(own)
            log.info("%s: data share now %d blocks", self.name, len(own))
        self._key = key
        return self._inner

    def records(self, settings: Mapping[str, Any]) -> int:
        """Training records (blocks) of this client's share under ``settings``."""
        return self._trainer(settings).records()

    def train(
        self, model: dict[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        if _leader():
            # Followers must hear the round before anyone builds a DDP model: its
            # constructor is itself a collective.
            import torch.distributed as dist

            dist.broadcast_object_list([(model, round, dict(settings))], src=0)
        return self._trainer(settings)._train(model, round, settings)

    def follow(self) -> None:
        """torchrun ranks other than 0: train each round rank 0 broadcasts, until released.

        The broadcast (torch.distributed, inside one client's node) carries the global
        model and settings rank 0 received; every rank derives the same data share
        and trains its slice of it under DDP.
        """
        import torch.distributed as dist

        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            model, rnd, settings = box[0]
            self._trainer(settings)._train(model, rnd, settings)

    def close(self) -> None:
        """Rank 0: release the followers (no-op outside torchrun)."""
        if _leader():
            import torch.distributed as dist

            dist.broadcast_object_list([None], src=0)
