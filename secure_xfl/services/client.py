"""The client process: a thin adapter that performs :class:`ClientRound`'s actions.

The state machine decides (accept or refuse a plan against this kit's own
policy, which weight to sign, when to re-target); this module moves messages,
runs the :class:`Trainer` in a worker thread, privatises with the DP spec the
state machine accepted, encrypts under the public context and signs with this
client's certificate key.

It rides out an aggregator restart: the :class:`Peer` keeps reconnecting with backoff
for ``transport.connect_deadline_s`` (then :class:`GaveUp`: exit 1, one ERROR line),
and after a reconnect the state machine says ``hello`` again. Its last sealed upload is
kept in ``KIT/state/last-upload.bin`` (:mod:`secure_xfl.services.upload_cache`) so a
re-opened round is answered with the same bytes, not retrained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import numpy as np
import torch

from secure_xfl import failpoints
from secure_xfl.crypto.codec import flatten, layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.errors import MaskError
from secure_xfl.crypto.lanes import check_context
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.errors import ConfigError, TrainingError
from secure_xfl.kit import Kit
from secure_xfl.privacy.silo import STATE_FILE, RecordBudgetExhausted, SiloAccount
from secure_xfl.protocol import messages
from secure_xfl.protocol.client import (
    Action,
    Call,
    ClientRound,
    Decline,
    Done,
    PublishKey,
    SealAndUpload,
    Train,
    Trained,
)
from secure_xfl.protocol.plan import ClientPolicy
from secure_xfl.protocol.seal import seal_upload
from secure_xfl.services.mask_client import MaskKeys
from secure_xfl.services.runtime import (
    GaveUp,
    Peer,
    PermanentFailure,
    install_stop_signals,
)
from secure_xfl.services.upload_cache import CachedUpload, load_upload, save_upload
from secure_xfl.training.lm import ModelError
from secure_xfl.training.trainer import Trainer
from secure_xfl.transport.errors import RemoteError

log = logging.getLogger("secure_xfl.client")

#: Exit status of a run that ended well.
EXIT_OK = 0
#: Exit status of a run that did not end well, including a client that gave up on an
#: aggregator it could not reach within ``transport.connect_deadline_s``.
EXIT_FAILED = 1
#: Exit status of a client whose own policy refused the aggregator's plans.
EXIT_REFUSED = 3
#: Exit status of a permanent connection or authentication failure, never retried: a
#: certificate refused (by either side), the peer at the address is not the aggregator
#: (``wrong_role``), this client is not enrolled or is revoked, another TLS failure.
EXIT_PERMANENT = 4

_EXPECT = {
    "hello": {"welcome"}, "task": {"round", "wait", "done"}, "decline": {"ack"},
    "cohort": {"members", "wait"},
}  # fmt: skip


def client_policy(kit: Kit) -> ClientPolicy:
    """This kit's own privacy policy: the weakest plan it will train on."""
    return ClientPolicy.from_config(kit.config)


def silo_account(kit: Kit) -> SiloAccount:
    """This silo's record-level account, from its kit's state directory."""
    cfg = kit.config
    return SiloAccount.load(
        kit.path / "state" / STATE_FILE,
        delta=cfg.privacy.delta,
        target=cfg.privacy.record.target_epsilon if cfg.privacy.record.noise_multiplier == 0
        else 0.0,
        budget=cfg.privacy.record.budget,
        rounds=cfg.federation.rounds,
    )  # fmt: skip


class ClientService:
    """One client's loop against the aggregator."""

    def __init__(self, kit: Kit, *, aggregator: str, trainer: Trainer) -> None:
        self.kit = kit
        self.name = kit.config.party.name
        self.preset = get_preset(kit.config.federation.preset)
        self.ctx = kit.public_context()
        check_context(self.ctx, self.preset, kit.config.lane_quant())
        self.trainer = trainer
        self.peer = Peer(
            tls=kit.tls, role="aggregator", address=aggregator, config=kit.config.transport
        )
        self.machine = ClientRound(self.name, client_policy(kit))
        self.masks = MaskKeys(kit, min_clients=kit.config.federation.min_clients)
        self.silo = silo_account(kit) if kit.config.privacy.record.enabled else None
        if self.silo is not None and not hasattr(trainer, "records"):
            raise ConfigError(
                f"{kit.path}: privacy.record.enabled demands record-level DP-SGD, which the "
                f"trainer {type(trainer).__name__} cannot run; use --trainer lm, or turn "
                "record-level DP off in this kit (then set client-level noise or allow_no_dp)"
            )
        if self.silo is not None:
            log.info("record-level DP: %s", self.silo.summary())
        self.outcome: Done | None = None
        self._vectors: dict[int, tuple[np.ndarray, Any]] = {}  # base round -> (vec, layout)
        self._trained: tuple[int, Trained] | None = None  # (base round, report) to cache
        self._state_dir = kit.path / "state"
        self._cache = load_upload(
            self._state_dir, client=self.name, cert=kit.tls.certificate,
            limit=kit.config.transport.max_message_bytes,
        )  # fmt: skip
        self._resend: CachedUpload | None = None  # the cached upload answering this plan
        self._reconnected = False  # the action being performed had to reconnect

    @property
    def rounds_done(self) -> list[int]:
        """Rounds whose upload was accepted."""
        return self.machine.rounds_done

    def _record_spec(self, act: Train) -> RecordDPSpec:
        """σ_r, q and steps for this round from the silo's own account, charged durably
        before training (raises :class:`RecordBudgetExhausted` to decline)."""
        assert act.record is not None
        records = getattr(self.trainer, "records", None)
        if records is None or self.silo is None:
            raise TrainingError(
                "this kit demands record-level DP (privacy.record.enabled) but the trainer "
                f"{type(self.trainer).__name__} cannot run DP-SGD; use --trainer lm"
            )
        n = int(records(act.hints))
        batch, steps = act.plan.local.batch_size, act.plan.local.local_steps
        if n < 1:
            raise TrainingError("no training records")
        spec = self.silo.plan(
            act.record, run=act.plan.run, round=act.plan.round,
            sample_rate=min(1.0, batch / n), steps=steps,
        )  # fmt: skip
        self.silo.commit(spec, run=act.plan.run, round=act.plan.round, attempt=act.plan.attempt)
        log.info(
            "round %d: DP-SGD σ_r=%.4g C_r=%g q=%.4g steps=%d; %s",
            act.plan.round, spec.noise_multiplier, spec.max_grad_norm, spec.sample_rate,
            spec.steps, self.silo.summary(),
        )  # fmt: skip
        return spec

    def _cached_for(self, act: Train) -> CachedUpload | None:
        """The sealed upload answering exactly this plan, if this client kept one."""
        cached = self._cache
        if cached is None or not cached.matches(act.plan):
            return None
        if not cached.fits(act.dp, act.record):
            log.warning("round %d: the cached upload does not meet this kit's DP today; "
                        "retraining", act.plan.round)  # fmt: skip
            return None
        return cached

    def _train(self, act: Train, record: RecordDPSpec | None) -> Trained:
        settings: dict[str, Any] = {
            "rule": act.plan.rule,
            "local_steps": act.plan.local.local_steps,
            "local_lr": act.plan.local.local_lr,
            "batch_size": act.plan.local.batch_size,
            "fedprox_mu": act.plan.local.fedprox_mu,
            **act.hints,
        }
        if record is not None:
            settings["dp_sgd"] = {
                "noise_multiplier": record.noise_multiplier,
                "max_grad_norm": record.max_grad_norm,
                "delta": record.delta,
                "sample_rate": record.sample_rate,
            }
        torch_model = {k: torch.from_numpy(v.copy()) for k, v in act.model.items()}
        layout = layout_of(torch_model)
        if layout.digest != act.plan.layout_digest:
            raise messages.ProtocolError("the model sent does not match the plan's layout")
        try:
            result = self.trainer.train(act.model, act.plan.round, settings)
        except ModelError as exc:
            names = ", ".join(sorted(act.model)[:3]) + (", …" if len(act.model) > 3 else "")
            raise TrainingError(
                f"the aggregator's model (tensors {names}) does not fit this client's trainer "
                f"{type(self.trainer).__name__}: start the aggregator with --model lm and "
                f"every client with --trainer lm (or vector:N with --trainer random) ({exc})"
            ) from exc
        upd = {k: torch.from_numpy(np.asarray(v)) for k, v in result.update.items()}
        self._vectors = {act.plan.round: (flatten(upd, layout), layout)}
        rate = (result.metrics or {}).get("throughput")
        log.info(
            "round %d: trained on %d samples (loss %s)",
            act.plan.round,
            result.num_samples,
            result.loss,
        )
        trained = Trained(
            result.num_samples, result.loss, None if rate is None else float(rate), record
        )
        self._trained = (act.plan.round, trained)
        return trained

    def _seal(self, act: SealAndUpload) -> bytes:
        """Clip, noise (fresh for every seal: only one copy is ever accepted), encrypt, sign."""
        vec, layout = self._vectors[act.base_round]
        plan = act.plan
        blob = seal_upload(act, vec, layout, ctx=self.ctx, preset=self.preset, client=self.name,
                           signing_key=self.kit.tls.private_key,
                           mask=self.masks.cohort(act))  # fmt: skip
        log.info(
            "round %d: upload %.2f MB (staleness %d)",
            act.round,
            len(blob) / 1e6,
            act.round - act.base_round,
        )
        if self._trained is not None and self._trained[0] == plan.round and not plan.masked:
            # Kept before it is sent: a restart mid-upload re-sends these bytes.
            self._cache = CachedUpload(
                run=plan.run, round=plan.round, attempt=plan.attempt,
                plan_digest=plan.digest, target=act.round, trained=self._trained[1], blob=blob,
            )  # fmt: skip
            save_upload(self._state_dir, self._cache)
        return blob

    def _upload_blob(self, act: SealAndUpload) -> bytes | None:
        """The bytes to upload: the cached ones when this plan was sealed before (None:
        they cannot answer ``act``), else a fresh seal."""
        cached = self._resend  # set for this plan's Train only (reset by the next one)
        if cached is None:
            return self._seal(act)
        if cached.target != act.round or not cached.matches(act.plan):
            return None  # re-targeted: no update vector here to seal for another round
        log.info("round %d: re-sent the same sealed upload (%.2f MB, run %s, attempt %d, "
                 "plan %s)", act.round, len(cached.blob) / 1e6, cached.run,
                 cached.attempt, cached.plan_digest.hex()[:12])  # fmt: skip
        return cached.blob

    async def _call(self, method: str, expect: set[str], **fields: Any) -> dict[str, Any]:
        """One call; notes whether it had to reconnect (the aggregator may be new)."""
        before = self.peer.connections
        reply = await self.peer.call(method, expect=expect, **fields)
        self._reconnected = self._reconnected or (before > 0 and self.peer.connections > before)
        return reply

    async def _perform(self, act: Action) -> list[Action]:
        """Perform one action; after a reconnect the machine's ``hello`` goes first."""
        self._reconnected = False
        actions = await self._perform_one(act)
        if self._reconnected:
            return [*self.machine.reconnected(time.monotonic()), *actions]
        return actions

    async def _perform_one(self, act: Action) -> list[Action]:
        m, now = self.machine, time.monotonic
        if isinstance(act, Call):
            try:
                reply = await self._call(act.method, _EXPECT[act.method], **act.fields)
            except RemoteError as exc:
                if act.method != "cohort":
                    raise
                return m.on_error(exc.code, exc.message, now())
            return m.on_reply(reply["t"], reply, now())
        if isinstance(act, PublishKey):
            key = self.masks.publish(act)
            try:
                reply = await self._call("mask_key", {"ack"}, round=act.round,
                                         epoch=act.epoch, key=key)  # fmt: skip
            except RemoteError as exc:
                return m.on_error(exc.code, exc.message, now())
            failpoints.hit("client.after_mask_key", act.round)
            return m.on_reply("ack", reply, now())
        if isinstance(act, Train):
            self._resend, self._vectors = None, {}
            # A masked upload answers one cohort only: never re-sent, re-masked instead.
            cached = None if act.plan.masked else self._cached_for(act)
            if cached is not None:
                # Same run, round, attempt and plan: no retraining, no new record-level
                # charge (the silo paid for this attempt), no new noise.
                log.info("round %d: this plan was trained and sealed before; re-sending "
                         "that upload (not retraining)", act.plan.round)  # fmt: skip
                self._resend = cached
                return m.trained(cached.trained)
            record = None
            if act.record is not None:
                try:
                    record = await asyncio.to_thread(self._record_spec, act)
                except RecordBudgetExhausted as exc:
                    return m.refuse_training(exc.reason, str(exc))
            return m.trained(await asyncio.to_thread(self._train, act, record))
        if isinstance(act, SealAndUpload):
            try:
                blob = await asyncio.to_thread(self._upload_blob, act)
            except MaskError as exc:
                return m.refuse_cohort(exc.reason, str(exc))
            if blob is None:
                return m.upload_dropped("a re-sent upload cannot be re-targeted to round "
                                        f"{act.round}")  # fmt: skip
            try:
                reply = await self._call(
                    "upload", {"ack"}, round=act.round, update=blob,
                    throughput=act.throughput, timeout=600.0,
                )  # fmt: skip
            except RemoteError as exc:
                return m.on_error(exc.code, exc.message, now())
            return m.on_reply("ack", reply, now())
        if isinstance(act, Decline):
            reply = await self._call(
                "decline", {"ack"}, round=act.round, reason=act.reason, detail=act.detail
            )
            return m.on_reply("ack", reply, now())
        self.outcome = act
        return []

    async def run(self, stop: asyncio.Event) -> bool:
        """Perform actions until the run ends (or ``stop``); True when it ended well."""
        queue: deque[Action] = deque(self.machine.start(time.monotonic()))
        try:
            while not stop.is_set() and self.outcome is None:
                if queue:
                    queue.extend(await self._perform(queue.popleft()))
                    continue
                deadline = self.machine.next_deadline()
                if deadline is None:
                    break  # nothing to wait for: the machine is stuck; stop rather than hang
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, deadline - time.monotonic()))
                queue.extend(self.machine.handle_timer(time.monotonic()))
            if self.outcome is None:
                return False
            if self.outcome.refused:
                log.error(
                    "run finished: %s; this client refused the aggregator's plan (%s)",
                    self.outcome.reason,
                    "; ".join(self.machine.refusals),
                )
            else:
                (log.info if self.outcome.ok else log.error)(
                    "run finished: %s", self.outcome.reason
                )
            return self.outcome.ok
        finally:
            await self.peer.close()


def exit_status(service: ClientService, ok: bool) -> int:
    """0: the run ended well; 3: this client's policy refused the plans; 1: otherwise
    (4, a permanent connection failure, is decided by :func:`serve_client`)."""
    if service.outcome is not None and service.outcome.refused:
        return EXIT_REFUSED
    return EXIT_OK if ok else EXIT_FAILED


async def serve_client(kit: Kit, *, aggregator: str, trainer: Trainer) -> int:
    """Run one client until the run ends or SIGTERM; returns its exit status:
    :data:`EXIT_OK`, :data:`EXIT_FAILED` (also: gave up on an unreachable aggregator),
    :data:`EXIT_REFUSED` or :data:`EXIT_PERMANENT` (one ERROR line names the cause)."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    service = ClientService(kit, aggregator=aggregator, trainer=trainer)
    work = asyncio.ensure_future(service.run(stop))
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
            return EXIT_FAILED
    stopped.cancel()
    try:
        ok = work.result()
    except PermanentFailure as exc:
        log.error("permanent failure, not retrying: %s", exc)
        return EXIT_PERMANENT
    except GaveUp as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except (RemoteError, messages.ProtocolError) as exc:
        # The aggregator refused a request or answered out of protocol: the run failed
        # (exit 1, one line), it is not a usage error of this client (exit 2).
        log.error("run failed: the aggregator at %s: %s", aggregator, exc)
        return EXIT_FAILED
    return exit_status(service, ok)
