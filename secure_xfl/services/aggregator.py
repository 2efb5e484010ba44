"""The aggregator process: a QUIC adapter around :class:`Coordinator`.

Clients (role ``client``) call ``hello``, ``task`` and ``upload``; a background
loop ticks the coordinator and forwards closed rounds to the key holder. All
coordinator calls are serialised by one lock and run in a worker thread, since
CKKS accumulation is CPU-bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from secure_xfl.crypto.context import check_context_matches, get_preset
from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.errors import SecureXFLError
from secure_xfl.kit import Kit
from secure_xfl.protocol import messages
from secure_xfl.protocol.coordinator import Coordinator, CoordinatorSettings
from secure_xfl.protocol.events import DecryptRequest, Finished, RoundRecord, Wait
from secure_xfl.protocol.plan import LocalTraining
from secure_xfl.protocol.rules import make_rule
from secure_xfl.services.runtime import Peer, install_stop_signals, parse_address, watch_crl
from secure_xfl.transport.errors import RemoteError
from secure_xfl.transport.rpc import RpcServer

log = logging.getLogger("secure_xfl.aggregator")


def coordinator_settings(kit: Kit) -> CoordinatorSettings:
    """What this aggregator proposes, from its own kit (clients and key holder check it)."""
    cfg = kit.config
    rule = cfg.round.rule
    return CoordinatorSettings(
        run=cfg.federation.run,
        rounds=cfg.federation.rounds,
        min_clients=cfg.federation.min_clients,
        timeout_s=cfg.round.timeout_s,
        dp=cfg.dp_spec(),
        record=cfg.record_floor(),
        local=LocalTraining(
            local_steps=cfg.round.local_steps,
            local_lr=cfg.round.local_lr,
            batch_size=cfg.round.batch_size,
            fedprox_mu=cfg.round.fedprox_mu,
        ),
        weighting=cfg.round.weighting,
        # e^{-L} weights are already ≤ 1; dividing them by a large cap would only
        # amplify the CKKS error floor.
        weight_cap=1.0 if rule == "dynamic" else cfg.round.effective_weight_cap,
        max_staleness=cfg.round.max_staleness,
        max_refused=cfg.privacy.max_refused_decryptions,
    )


class AggregatorService:
    """Owns the coordinator, the RPC handler and the key-holder connection."""

    def __init__(
        self,
        kit: Kit,
        *,
        keyholder: str,
        model: dict[str, np.ndarray],
        out_dir: Path | None = None,
        evaluator: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None,
    ) -> None:
        cfg = kit.config
        self.evaluator = evaluator
        self.kit = kit
        self.preset = get_preset(cfg.federation.preset)
        ctx = kit.public_context()
        check_context_matches(ctx, self.preset)
        self._certs = kit.client_certificates()
        self.core = Coordinator(
            coordinator_settings(kit),
            ctx=ctx,
            preset=self.preset,
            enrolled=self._enrolled,
            model=model,
            rule=make_rule(cfg.round.rule, lr=cfg.round.server_lr),
            now=time.monotonic(),
        )
        self.keyholder = Peer(
            tls=kit.tls, role="keyholder", address=keyholder, config=cfg.transport
        )
        self.out_dir = out_dir
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()  # an input arrived: the round may be due now
        self._done_seen: set[str] = set()
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._save_model(0)
            if evaluator is not None:
                initial = evaluator(self.core.model())
                (out_dir / "initial.json").write_text(json.dumps(initial))
                log.info("initial model: %s", json.dumps(initial))

    def _enrolled(self) -> dict[str, Any]:
        return self._certs

    def refresh_enrolment(self) -> None:
        """Re-read the kit's client certificates (new clients, revocations)."""
        self._certs = self.kit.client_certificates()

    # -- client requests ---------------------------------------------------------------
    async def handle(self, peer: PeerIdentity, data: bytes) -> bytes:
        msg = messages.decode(data, expect={"hello", "task", "upload", "decline"})
        name = peer.name
        if name not in self._certs:
            self.refresh_enrolment()  # a client added after start-up
        async with self._lock:
            if msg["t"] == "hello":
                return messages.encode("welcome", **self.core.hello(name))
            if msg["t"] == "task":
                after = messages.require(msg, "after", int, lo=-1, hi=2**31)
                attempt = messages.require(msg, "attempt", int, lo=0, hi=2**31, optional=True)
                return self._task(name, after, 1 << 30 if attempt is None else attempt)
            rnd = messages.require(msg, "round", int, lo=0, hi=2**31)
            if msg["t"] == "decline":
                reason = messages.require(msg, "reason", str)[:64]
                detail = messages.require(msg, "detail", str)[:512]
                self.core.decline(name, rnd, reason, detail, time.monotonic())
                self._wake.set()
                return messages.encode("ack", round=rnd, accepted=False)
            blob = messages.require(msg, "update", bytes)
            rate = messages.require(msg, "throughput", float, lo=0, hi=1e12, optional=True)
            ack = await asyncio.to_thread(self.core.upload, name, rnd, blob, rate)
            self._wake.set()
            return messages.encode("ack", round=ack.round, accepted=True, count=ack.count)

    def _task(self, name: str, after: int, attempt: int) -> bytes:
        out = self.core.task(name, after, time.monotonic(), attempt)
        if isinstance(out, Finished):
            self._done_seen.add(name)
            return messages.encode("done", reason=out.reason, rounds=out.rounds, ok=out.ok)
        if isinstance(out, Wait):
            return messages.encode("wait", retry_s=out.retry_s)
        reply = messages.encode(
            "round",
            round=out.plan.round,
            plan=out.plan.to_wire(),
            model=messages.pack_tensors(out.model),
            hints=out.hints,
        )
        self.core.note_download(len(reply))
        self._wake.set()  # the deadline now runs from this first hand-out
        return reply

    # -- the round loop ----------------------------------------------------------------
    async def _decrypt(self, req: DecryptRequest) -> None:
        core = self.core
        try:
            reply = await self.keyholder.call(
                "decrypt", expect={"plain"}, aggregate=req.aggregate, timeout=600.0
            )
            vec = messages.unpack_vector(reply.get("vector"), core.layout.numel)
            info = {
                "participants": reply.get("participants"),
                "noise_multiplier": reply.get("noise_multiplier"),
                "epsilon": reply.get("epsilon"),
                "total_weight": reply.get("total_weight"),
            }
            async with self._lock:
                now = time.monotonic()
                record = await asyncio.to_thread(core.decrypted, req.round, vec, info, now)
                if self.evaluator is not None:
                    metrics = await asyncio.to_thread(self.evaluator, core.model())
                    core.annotate(record.round, metrics)
                self._log_round(record)
                self._save_model(req.round + 1)
        except RemoteError as exc:
            async with self._lock:
                core.decrypt_failed(req.round, exc, time.monotonic(), reason=exc.reason)
        except SecureXFLError as exc:
            async with self._lock:
                core.decrypt_failed(req.round, exc, time.monotonic())

    def _log_round(self, rec: RoundRecord) -> None:
        line = {
            "round": rec.round,
            "participants": list(rec.participants),
            "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down,
            "seconds": round(rec.finished_at - rec.opened_at, 3),
            **{k: v for k, v in rec.info.items() if k != "participants"},
        }
        log.info("round %d done: %s", rec.round, json.dumps(line))
        if self.out_dir is not None:
            with open(self.out_dir / "rounds.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")

    def _save_model(self, round: int) -> None:
        if self.out_dir is None:
            return
        params = self.core.params
        np.save(self.out_dir / f"global-{round}.npy", params, allow_pickle=False)

    async def _sleep_until(self, deadline: float | None, stop: asyncio.Event) -> None:
        """Sleep until the coordinator's next deadline, an input, or ``stop``."""
        self._wake.clear()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        for task in pending:
            task.cancel()

    async def run(self, stop: asyncio.Event, *, linger_s: float = 30.0) -> bool:
        """Drive the coordinator until the run finishes (or ``stop``); then let clients
        hear ``done``."""
        core = self.core
        while not stop.is_set() and core.phase != "finished":
            async with self._lock:
                req = core.handle_timer(time.monotonic())
                deadline = core.next_deadline()
            if req is not None:
                await self._decrypt(req)
            else:
                await self._sleep_until(deadline, stop)
        deadline_end = time.monotonic() + linger_s
        while not stop.is_set() and time.monotonic() < deadline_end:
            if self._done_seen >= set(self._certs):
                break
            await asyncio.sleep(0.1)
        await self.keyholder.close()
        if self.out_dir is not None:
            (self.out_dir / "outcome.json").write_text(
                json.dumps(
                    {
                        "ok": core.ok,
                        "outcome": core.outcome,
                        "rounds": len(core.history),
                        "budget_exhausted": core.budget_exhausted,
                    }
                )
            )
        return core.ok


def request_limits(core: Coordinator) -> Callable[[str], int]:
    """Largest acceptable request per message type (the transport refuses the rest as
    it arrives): control messages are small; an upload is one encrypted update of
    ``core.layout`` under ``core.preset`` — a fresh ciphertext's measured size times the
    chunk count (packed presets: ``slots x lanes`` values per chunk, from the current
    plan, as ``QuantSpec.chunk_params``) — plus 10 % and 64 KiB for the signed statement
    and msgpack framing."""
    from secure_xfl.crypto.codec import encrypt_slots
    from secure_xfl.transport.limits import limits_table

    preset, numel, quant = core.preset, core.layout.numel, core.plan.quant
    scale = None if quant is None else 2.0**quant.scale_bits
    chunk = len(encrypt_slots(core.ctx, [np.zeros(preset.slots)], scale=scale)[0])

    def upload() -> int:
        q = core.plan.quant  # lanes follow the plan (they depend on the enrolment)
        chunks = -(-numel // (preset.slots * (1 if q is None else q.lanes)))
        return int(chunks * chunk * 1.1) + (64 << 10)

    small = 16 << 10  # decline: reason and detail strings of ≤ 4096 bytes each
    return limits_table({"hello": small, "task": small, "decline": small, "upload": upload})


async def serve_aggregator(
    kit: Kit,
    *,
    listen: str,
    keyholder: str,
    model: dict[str, np.ndarray],
    out_dir: Path | None = None,
    evaluator: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None,
    ready: Any = None,
) -> bool:
    """Run the aggregator until the run ends or SIGTERM; True when all rounds completed."""
    service = AggregatorService(
        kit,
        keyholder=keyholder,
        model=model,
        out_dir=out_dir,
        evaluator=evaluator,
    )
    server = RpcServer(
        tls=kit.tls,
        allowed_roles=("client",),
        handler=service.handle,
        config=kit.config.transport,
        limits=request_limits(service.core),
    )
    host, port = parse_address(listen)
    bound = await server.start(host, port)
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    install_stop_signals(stop)
    watcher = asyncio.ensure_future(
        watch_crl(kit, server, stop, on_change=service.refresh_enrolment)
    )
    log.info("aggregator of run %s serving on %s:%d", kit.config.federation.run, host, bound)
    try:
        return await service.run(stop)
    finally:
        stop.set()
        await watcher
        await server.close()
        log.info("aggregator stopped: %s", service.core.outcome or "interrupted")
