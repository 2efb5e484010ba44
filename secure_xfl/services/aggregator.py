"""The aggregator process: a QUIC adapter around :class:`Coordinator`.

Clients (role ``client``) call ``hello``, ``task`` and ``upload``; a background
loop ticks the coordinator and forwards closed rounds to the key holder. All
coordinator calls are serialised by one lock and run in a worker thread, since
CKKS accumulation is CPU-bound.

Crash safety (files: :mod:`.aggregator_state`). A fresh start writes a checkpoint of
round 0 before serving; a start that finds one resumes from it, asks the key holder
for its last released round and reconciles (re-sending a pending aggregate, or
refusing to start when a round would be skipped or applied twice). A closed round's
aggregate is written to ``pending.bin`` before it is sent, and the same bytes are
re-sent while the key holder is unreachable or answers ``storage_unavailable``. After a
release the outputs and the checkpoint are written (retried with backoff while they
cannot be; no client is offered the next round before) and only then is
``pending.bin`` deleted. SIGTERM writes a checkpoint and ends the process with 0.
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

from secure_xfl import failpoints
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.lanes import check_context
from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.errors import SecureXFLError
from secure_xfl.fsio import StorageError
from secure_xfl.kit import Kit
from secure_xfl.protocol import messages
from secure_xfl.protocol.checkpoint import Pending, model_layout, settings_digest
from secure_xfl.protocol.coordinator import Coordinator
from secure_xfl.protocol.events import DecryptRequest, Finished, RoundRecord, Wait
from secure_xfl.protocol.rules import make_rule
from secure_xfl.services.aggregator_state import (
    AggregatorFiles,
    Retry,
    coordinator_settings,
    default_checkpoint_dir,
    reconcile,
    request_limits,
    round_line,
    until_stop,
)
from secure_xfl.services.long_poll import LongPoll
from secure_xfl.services.runtime import (
    GaveUp,
    Peer,
    install_stop_signals,
    parse_address,
    watch_crl,
)
from secure_xfl.transport.errors import RemoteError
from secure_xfl.transport.rpc import RpcServer

log = logging.getLogger("secure_xfl.aggregator")

__all__ = ["AggregatorService", "coordinator_settings", "request_limits", "serve_aggregator"]

#: Key-holder answers that mean "not now": the same pending bytes are sent again.
STORAGE_UNAVAILABLE = "storage_unavailable"


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
        check_context(ctx, self.preset, kit.config.lane_quant())
        self._certs = kit.client_certificates()
        settings = coordinator_settings(kit)
        rule = make_rule(cfg.round.rule, lr=cfg.round.server_lr)
        layout, numel = model_layout(model)
        self.files = AggregatorFiles(
            default_checkpoint_dir(kit.path, out_dir),
            out_dir,
            run=settings.run,
            pending_limit=cfg.transport.max_message_bytes,
        )
        digest = settings_digest(settings, preset=self.preset.name, rule=rule.name,
                                 rule_lr=rule.lr, layout=layout)  # fmt: skip
        state = self.files.load_checkpoint(numel, digest)  # CheckpointError: refuse to start
        self.resumed = state is not None
        self.core = Coordinator(settings, ctx=ctx, preset=self.preset, enrolled=self._enrolled,
                                model=model, rule=rule, now=time.monotonic(),
                                state=state)  # fmt: skip
        self.keyholder = Peer(
            tls=kit.tls, role="keyholder", address=keyholder, config=cfg.transport
        )
        self.out_dir = out_dir
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()  # an input arrived: the round may be due now
        self._poll = LongPoll(self._lock)  # task/cohort waits answered when the state moves
        self._done_seen: set[str] = set()
        self._held = False  # True while the open round's checkpoint is not durable yet
        self._resend: DecryptRequest | None = None  # a pending aggregate found on resume

    def _enrolled(self) -> dict[str, Any]:
        return self._certs

    def refresh_enrolment(self) -> None:
        """Re-read the kit's client certificates (new clients, revocations)."""
        self._certs = self.kit.client_certificates()

    # -- start-up ----------------------------------------------------------------------
    async def prepare(self, stop: asyncio.Event) -> bool:
        """Before serving: write the first checkpoint, or reconcile a resumed one with
        the key holder (:class:`ResumeRefused` when they disagree). False: stopped."""
        core = self.core
        if not self.resumed:
            self.files.clear_pending()  # a leftover without its checkpoint means nothing
            if self.evaluator is not None and self.out_dir is not None:
                initial = self.evaluator(core.model())
                log.info("initial model: %s", json.dumps(initial))
                if not await self._durably(lambda: self.files.save_json("initial.json", initial),
                                           stop):  # fmt: skip
                    return False
            return await self._persist(stop)
        if core.phase == "finished":
            log.info("run %s already finished before this restart: %s (remove %s to run "
                     "it again)", core.settings.run, core.outcome, self.files.dir)  # fmt: skip
            return True
        pending = self.files.load_pending()
        info = await self._with_keyholder("status", {"info"}, stop, run=core.settings.run)
        if info is None:
            return False
        decision = reconcile(run=core.settings.run, round=core.round, attempt=core.attempt,
                             pending=pending, info=info)  # fmt: skip
        if decision == "resend" and pending is not None:
            log.info("round %d: re-sending the pending aggregate (sha256 %s) to the key holder",
                     core.round, pending.digest[:16])  # fmt: skip
            self._resend = core.resume_decrypting(pending.attempt, pending.aggregate,
                                                  time.monotonic())  # fmt: skip
        elif decision == "stale":
            self.files.clear_pending()
        return True

    # -- client requests ---------------------------------------------------------------
    async def handle(self, peer: PeerIdentity, data: bytes) -> bytes:
        msg = messages.decode(
            data, expect={"hello", "task", "upload", "decline", "mask_key", "cohort"}
        )
        name = peer.name
        if name not in self._certs:
            self.refresh_enrolment()  # a client added after start-up
        if msg["t"] == "task":
            after = messages.require(msg, "after", int, lo=-1, hi=2**31)
            attempt = messages.require(msg, "attempt", int, lo=0, hi=2**31, optional=True)
            attempt = 1 << 30 if attempt is None else attempt
            return await self._poll.answer(lambda: self._task(name, after, attempt))
        if msg["t"] == "cohort":
            rnd = messages.require(msg, "round", int, lo=0, hi=2**31)
            epoch = messages.require(msg, "epoch", int, lo=0, hi=1_000_000)
            return await self._poll.answer(lambda: self._members(name, rnd, epoch))
        async with self._lock:
            if msg["t"] == "hello":
                return messages.encode("welcome", **self.core.hello(name))
            rnd = messages.require(msg, "round", int, lo=0, hi=2**31)
            if msg["t"] == "decline":
                reason = messages.require(msg, "reason", str)[:64]
                detail = messages.require(msg, "detail", str)[:512]
                self.core.decline(name, rnd, reason, detail, time.monotonic())
                self._poke()
                return messages.encode("ack", round=rnd, accepted=False)
            if msg["t"] == "mask_key":
                epoch = messages.require(msg, "epoch", int, lo=0, hi=1_000_000)
                self.core.mask_key(name, rnd, epoch, messages.require(msg, "key", list))
                self._poke()  # the cohort may be complete now
                return messages.encode("ack", round=rnd, accepted=True)
            blob = messages.require(msg, "update", bytes)
            rate = messages.require(msg, "throughput", float, lo=0, hi=1e12, optional=True)
            ack = await asyncio.to_thread(self.core.upload, name, rnd, blob, rate)
            self._poke()
            return messages.encode("ack", round=ack.round, accepted=True, count=ack.count)

    def _poke(self) -> None:
        """An input arrived or the state moved: wake the round loop and held requests."""
        self._wake.set()
        self._poll.moved()

    def _members(self, name: str, rnd: int, epoch: int) -> tuple[bytes, bool]:
        members = self.core.members(name, rnd, epoch)
        if members is None:
            return messages.encode("wait", retry_s=0.05), True
        return messages.encode("members", round=rnd, epoch=epoch, members=members), False

    def _task(self, name: str, after: int, attempt: int) -> tuple[bytes, bool]:
        if self._held:  # the round is open in memory only: offer it once it is durable
            return messages.encode("wait", retry_s=1.0), True
        out = self.core.task(name, after, time.monotonic(), attempt)
        if isinstance(out, Finished):
            self._done_seen.add(name)
            reply = messages.encode("done", reason=out.reason, rounds=out.rounds, ok=out.ok)
            return reply, False
        if isinstance(out, Wait):
            return messages.encode("wait", retry_s=out.retry_s), True
        reply = messages.encode(
            "round",
            round=out.plan.round,
            plan=out.plan.to_wire(),
            model=messages.pack_tensors(out.model),
            hints=out.hints,
            epoch=out.epoch,
        )
        self.core.note_download(len(reply))
        self._wake.set()  # the deadline now runs from this first hand-out
        return reply, False

    # -- the key holder ----------------------------------------------------------------
    async def _with_keyholder(
        self, method: str, expect: set[str], stop: asyncio.Event, **fields: Any
    ) -> dict[str, Any] | None:
        """One key-holder call, retried with backoff (the same bytes) while the key holder
        is unreachable or cannot store its record; ``None`` once ``stop`` is set."""
        retry = Retry()
        while True:
            try:
                call = self.keyholder.call(method, expect=expect, timeout=600.0, **fields)
                return await until_stop(call, stop)
            except RemoteError as exc:
                if STORAGE_UNAVAILABLE not in (exc.code, exc.reason):
                    raise
                log.warning("key holder cannot store its record (%s); retrying %s in %.1fs "
                            "(the round is not burnt)", exc, method, retry.delay)  # fmt: skip
            except GaveUp as exc:
                log.warning("key holder unreachable (%s); retrying %s in %.1fs", exc, method,
                            retry.delay)  # fmt: skip
            if not await retry.pause(stop):
                return None

    async def _decrypt(self, req: DecryptRequest, stop: asyncio.Event, *, fresh: bool) -> None:
        """Send a closed round's aggregate (kept in ``pending.bin`` first) and apply it."""
        core = self.core
        if fresh:
            failpoints.hit("aggregator.after_close", req.round)
            pending = Pending(core.settings.run, req.round, core.attempt, req.aggregate)
            if not await self._durably(lambda: self.files.save_pending(pending), stop):
                return
            failpoints.hit("aggregator.after_pending", req.round)
        try:
            reply = await self._with_keyholder("decrypt", {"plain"}, stop,
                                               aggregate=req.aggregate)  # fmt: skip
            if reply is None:
                return  # stopped: the pending aggregate is re-sent after the restart
            failpoints.hit("aggregator.after_release", req.round)
            vec = messages.unpack_vector(reply.get("vector"), core.layout.numel)
            keys = ("participants", "noise_multiplier", "epsilon", "total_weight")
            info = {k: reply.get(k) for k in keys}
            async with self._lock:
                self._held = True
                now = time.monotonic()
                record = await asyncio.to_thread(core.decrypted, req.round, vec, info, now)
                if self.evaluator is not None:
                    metrics = await asyncio.to_thread(self.evaluator, core.model())
                    core.annotate(record.round, metrics)
                self._log_round(record)
        except RemoteError as exc:
            async with self._lock:
                core.decrypt_failed(req.round, exc, time.monotonic(), reason=exc.reason)
        except SecureXFLError as exc:
            async with self._lock:
                core.decrypt_failed(req.round, exc, time.monotonic())
        else:
            if not await self._persist(stop):
                return
            failpoints.hit("aggregator.after_checkpoint", req.round)
            await self._durably(self.files.clear_pending, stop)
            return
        # Refused: the round re-opens (another attempt) or the run ends; either way the
        # refused aggregate must never be sent again.
        if await self._persist(stop):
            await self._durably(self.files.clear_pending, stop)

    # -- durable state -----------------------------------------------------------------
    async def _durably(self, write: Callable[[], None], stop: asyncio.Event) -> bool:
        """Run ``write`` until it succeeds (one ERROR line, then retries with backoff);
        False when ``stop`` came first."""
        retry, failing = Retry(), False
        while True:
            try:
                await asyncio.to_thread(write)
            except StorageError as exc:
                if not failing:
                    log.error("%s; keeping the run's state in memory and retrying with backoff "
                              "(the run goes on once it is written)", exc)  # fmt: skip
                    failing = True
                else:
                    log.warning("still cannot write (attempt %d): %s", retry.attempts + 1, exc)
                if not await retry.pause(stop):
                    return False
            else:
                if failing:
                    log.info("state written after %d retries", retry.attempts)
                return True

    async def _state_writer(self) -> Callable[[], None]:
        """Writes the outputs of the state now (``global-<round>.npy`` of the open round,
        ``rounds.jsonl``), then its checkpoint: the commit point of a round."""
        async with self._lock:
            state = self.core.snapshot()
            history = list(self.core.history)

        def write() -> None:
            self.files.save_outputs(state.round, state.params, history)
            self.files.save_checkpoint(state)

        return write

    async def _persist(self, stop: asyncio.Event) -> bool:
        """Write the state (:meth:`_state_writer`) until it is durable; offers of the open
        round resume only then."""
        self._held = True
        if not await self._durably(await self._state_writer(), stop):
            return False
        async with self._lock:
            self.core.reopen_clock(time.monotonic())
            self._held = False
        self._poke()
        return True

    def _log_round(self, rec: RoundRecord) -> None:
        line = json.dumps(
            round_line(rec), default=lambda v: v.item() if isinstance(v, np.generic) else str(v)
        )
        log.info("round %d done: %s", rec.round, line)

    # -- the round loop ----------------------------------------------------------------
    async def _sleep_until(self, deadline: float | None, stop: asyncio.Event) -> None:
        """Sleep until the coordinator's next deadline, an input, or ``stop``."""
        self._wake.clear()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        for task in pending:
            task.cancel()

    async def run(self, stop: asyncio.Event, *, linger_s: float = 30.0) -> bool:
        """Drive the coordinator until the run finishes (then let clients hear ``done``),
        or until ``stop`` (then checkpoint: True when that checkpoint is durable)."""
        core = self.core
        resend, self._resend = self._resend, None
        if resend is not None:
            await self._decrypt(resend, stop, fresh=False)
        while not stop.is_set() and core.phase != "finished":
            async with self._lock:
                req = core.handle_timer(time.monotonic())
                deadline = core.next_deadline()
            self._poll.moved()  # a timer may have fixed a cohort or closed the round
            if req is not None:
                await self._decrypt(req, stop, fresh=True)
            elif deadline is not None:  # None: handle_timer just ended the run
                await self._sleep_until(deadline, stop)
        if core.phase != "finished":
            return await self.checkpoint_on_stop()
        await self._persist(stop)  # the finished state: a restart only says so
        outcome = {"ok": core.ok, "outcome": core.outcome, "rounds": len(core.history),
                   "budget_exhausted": core.budget_exhausted}  # fmt: skip
        await self._durably(lambda: self.files.save_json("outcome.json", outcome), stop)
        deadline_end = time.monotonic() + linger_s
        while not stop.is_set() and time.monotonic() < deadline_end:
            if self._done_seen >= set(self._certs):
                break
            await asyncio.sleep(0.1)
        await self.keyholder.close()
        return core.ok

    async def checkpoint_on_stop(self) -> bool:
        """After SIGTERM: write the checkpoint; True when it is durable."""
        await self.keyholder.close()
        try:
            await asyncio.to_thread(await self._state_writer())
        except StorageError as exc:
            log.error("stopped, but the checkpoint could not be written (%s): a restart "
                      "resumes from the last durable one", exc)  # fmt: skip
            return False
        log.info("checkpointed at round %d; restart with the same command to resume",
                 self.core.round)  # fmt: skip
        return True


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
    """Run the aggregator until the run ends or SIGTERM; True when all rounds completed,
    or when SIGTERM left a durable checkpoint to resume from. A checkpoint that cannot be
    used, or that the key holder contradicts, raises a typed error before serving."""
    service = AggregatorService(
        kit,
        keyholder=keyholder,
        model=model,
        out_dir=out_dir,
        evaluator=evaluator,
    )
    stop = asyncio.Event()
    install_stop_signals(stop)
    if not await service.prepare(stop):
        return await service.checkpoint_on_stop()
    server = RpcServer(
        tls=kit.tls,
        allowed_roles=("client",),
        handler=service.handle,
        config=kit.config.transport,
        limits=request_limits(service.core),
        parallel_types=("upload",),
    )
    host, port = parse_address(listen)
    bound = await server.start(host, port)
    if ready is not None:
        ready(bound)
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
