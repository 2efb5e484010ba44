"""The client process: fetch a round, train locally, protect the update, upload it.

The local training itself is a :class:`Trainer`; this module only moves
messages. The protected update is clipped and noised (when the run's σ > 0),
encrypted under the public context and signed with this client's certificate key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from secure_xfl.crypto.codec import TensorLayout, flatten, layout_of
from secure_xfl.crypto.context import check_context_matches, get_preset
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.protect import protect_vector
from secure_xfl.errors import TrainingError
from secure_xfl.kit import Kit
from secure_xfl.privacy.dp import DPConfig
from secure_xfl.protocol import messages
from secure_xfl.protocol.rules import client_weight
from secure_xfl.services.runtime import Peer, install_stop_signals
from secure_xfl.training.trainer import Trainer
from secure_xfl.transport.errors import RemoteError

log = logging.getLogger("secure_xfl.client")


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """FedBuff-style polynomial discount (1 + τ)^-a for an update τ rounds old."""
    return float((1 + max(staleness, 0)) ** -exponent)


@dataclass(frozen=True)
class _Pending:
    """A trained update waiting to be sealed (possibly more than once in async runs)."""

    run: str
    base_round: int
    vec: np.ndarray
    layout: TensorLayout
    weight: float
    weighting: Literal["aggregator", "client"]
    loss: float | None
    settings: Mapping[str, Any]
    throughput: float | None
    quant: QuantSpec | None = None


def dp_config(settings: Mapping[str, Any]) -> DPConfig | None:
    """The announced DP settings, or None when σ = 0 (DP off)."""
    sigma = float(settings.get("noise_multiplier", 0.0))
    if sigma <= 0:
        return None
    return DPConfig(
        clip_norm=float(settings["clip_norm"]),
        noise_multiplier=sigma,
        min_clients=int(settings["min_clients"]),
        delta=float(settings.get("delta", 1e-5)),
    )


class ClientService:
    """One client's loop against the aggregator."""

    def __init__(self, kit: Kit, *, aggregator: str, trainer: Trainer) -> None:
        self.kit = kit
        self.name = kit.config.party.name
        self.preset = get_preset(kit.config.federation.preset)
        self.ctx = kit.public_context()
        check_context_matches(self.ctx, self.preset)
        self.trainer = trainer
        self.peer = Peer(
            tls=kit.tls, role="aggregator", address=aggregator, config=kit.config.transport
        )
        self.rounds_done: list[int] = []

    def _train(self, msg: Mapping[str, Any]) -> _Pending:
        rnd = messages.require(msg, "round", int, lo=0, hi=2**31)
        run = messages.require(msg, "run", str)
        if run != self.kit.config.federation.run:
            raise TrainingError(
                f"aggregator announced run {run!r}, our kit is for "
                f"{self.kit.config.federation.run!r}"
            )
        model = messages.unpack_tensors(msg.get("model"))
        settings = messages.require(msg, "settings", dict)
        weighting = messages.require(msg, "weighting", str)
        cap = messages.require(msg, "weight_cap", float, lo=1e-12)
        layout = layout_of({k: torch.from_numpy(v.copy()) for k, v in model.items()})
        layout.check(messages.require(msg, "layout", bytes))
        result = self.trainer.train(model, rnd, settings)
        upd = {k: torch.from_numpy(np.asarray(v)) for k, v in result.update.items()}
        rule = str(settings.get("rule", "fedavg"))
        ref = settings.get("loss_ref")
        weight = client_weight(
            rule, result.num_samples, result.loss, cap, None if ref is None else float(ref)
        )
        if weighting == "client" and rule != "dynamic":
            weight = weight / cap
        rate = (result.metrics or {}).get("throughput")
        log.info("round %d: trained on %d samples (loss %s)", rnd, result.num_samples, result.loss)
        return _Pending(
            run=run,
            base_round=rnd,
            vec=flatten(upd, layout),
            layout=layout,
            weight=weight,
            weighting="client" if weighting == "client" else "aggregator",
            loss=result.loss,
            settings=settings,
            throughput=None if rate is None else float(rate),
            quant=None if msg.get("quant") is None else QuantSpec.from_wire(msg["quant"]),
        )

    def _seal(self, p: _Pending, round: int) -> bytes:
        """Clip, noise, encrypt and sign for ``round``; stale async updates weigh less."""
        staleness = round - p.base_round
        protected = protect_vector(
            p.vec,
            ctx=self.ctx,
            preset=self.preset,
            layout=p.layout,
            run=p.run,
            round=round,
            client=self.name,
            signing_key=self.kit.tls.private_key,
            weight=p.weight * staleness_weight(staleness),
            weighting=p.weighting,
            loss=p.loss,
            dp=dp_config(p.settings),  # fresh noise: only one sealed copy is ever accepted
            quant=p.quant,
            max_clients=p.quant.max_clients if p.quant else 8,
        )
        blob = protected.encode()
        log.info("round %d: upload %.2f MB (staleness %d)", round, len(blob) / 1e6, staleness)
        return blob

    async def _upload(self, p: _Pending) -> None:
        """Upload; in buffered-async runs re-target a newer round when ours closed."""
        target = p.base_round
        buffered = p.settings.get("rule") == "async"
        max_stale = int(p.settings.get("max_staleness", 4))
        while True:
            blob = await asyncio.to_thread(self._seal, p, target)
            try:
                await self.peer.call(
                    "upload",
                    expect={"ack"},
                    round=target,
                    update=blob,
                    throughput=p.throughput,
                    timeout=600.0,
                )
                return
            except RemoteError as exc:
                if exc.code not in ("duplicate_update", "round_closed"):
                    raise
                if not buffered or exc.code == "duplicate_update":
                    log.warning("round %d upload not counted: %s", target, exc)
                    return
            newer, rounds = target, 0
            for _ in range(150):  # the closed round may still be decrypting: ≤ 30 s
                status = await self.peer.call("hello", expect={"welcome"})
                newer, rounds = int(status.get("round", target)), int(status.get("rounds", 0))
                if newer > target:
                    break
                await asyncio.sleep(0.2)
            if newer <= target or newer >= rounds:
                log.warning("round %d closed and no newer round is open; update dropped", target)
                return
            target = newer
            if target - p.base_round > max_stale:
                log.warning("update from round %d too stale; dropped", p.base_round)
                return

    async def run(self, stop: asyncio.Event) -> bool:
        """Work rounds until the aggregator says ``done``; True when the run ended well."""
        welcome = await self.peer.call("hello", expect={"welcome"})
        log.info("joined run %s at round %s", welcome.get("run"), welcome.get("round"))
        last = -1
        try:
            while not stop.is_set():
                msg = await self.peer.call("task", expect={"round", "wait", "done"}, after=last)
                if msg["t"] == "done":
                    reason = str(msg.get("reason", ""))
                    ok = msg.get("ok") is True
                    (log.info if ok else log.error)("run finished: %s", reason)
                    return ok
                if msg["t"] == "wait":
                    await asyncio.sleep(float(messages.require(msg, "retry_s", float, lo=0, hi=60)))
                    continue
                pending = await asyncio.to_thread(self._train, msg)
                await self._upload(pending)
                last = pending.base_round
                self.rounds_done.append(last)
            return False
        finally:
            await self.peer.close()


async def serve_client(kit: Kit, *, aggregator: str, trainer: Trainer) -> bool:
    """Run one client until the run ends or SIGTERM."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    work = asyncio.ensure_future(
        ClientService(kit, aggregator=aggregator, trainer=trainer).run(stop)
    )
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        # SIGTERM: let the current step finish briefly (it checks ``stop``), then cancel,
        # so a client still connecting or backing off does not linger.
        done, _ = await asyncio.wait({work}, timeout=10.0)
        if not done:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            log.info("stopped by signal")
            return False
    stopped.cancel()
    return work.result()
