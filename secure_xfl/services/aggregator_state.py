"""The aggregator's settings, durable files and resume decision.

Files (every write through :func:`secure_xfl.fsio.atomic_write`, every read
size-bounded): the checkpoint ``state.npz`` and the pending aggregate ``pending.bin``
(format: :mod:`secure_xfl.protocol.checkpoint`) in the checkpoint folder —
``OUT/checkpoint/`` with ``--out OUT``, else ``KIT/state/aggregator/`` — and, in
``OUT``, the outputs ``global-N.npy``, ``rounds.jsonl`` (regenerated whole from the
history, so a round re-applied after a restart is listed once), ``initial.json`` and
``outcome.json``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from secure_xfl.errors import SecureXFLError
from secure_xfl.fsio import StorageError, atomic_write, fsync_dir, read_bounded
from secure_xfl.kit import Kit
from secure_xfl.protocol.checkpoint import (
    CheckpointError,
    CoordinatorState,
    Pending,
    checkpoint_limit,
    decode_checkpoint,
    decode_pending,
    encode_checkpoint,
    encode_pending,
)
from secure_xfl.protocol.coordinator import Coordinator, CoordinatorSettings
from secure_xfl.protocol.events import RoundRecord
from secure_xfl.protocol.plan import LocalTraining

log = logging.getLogger("secure_xfl.aggregator")

T = TypeVar("T")

CHECKPOINT = "state.npz"
PENDING = "pending.bin"

__all__ = ["AggregatorFiles", "ResumeRefused", "Retry", "coordinator_settings",
           "default_checkpoint_dir", "reconcile", "request_limits", "round_line",
           "until_stop"]  # fmt: skip


class ResumeRefused(SecureXFLError):
    """The checkpoint and the key holder disagree: resuming would skip or repeat a round."""

    code = "resume_refused"


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
        masking=cfg.privacy.masking,
        max_clients=cfg.federation.max_clients,
        mask_timeout_s=cfg.round.mask_timeout_s,
    )


def _json(obj: object) -> bytes:
    def plain(v: object) -> Any:
        if isinstance(v, np.generic):
            return v.item()
        raise TypeError(f"{type(v).__name__} is not JSON")

    return json.dumps(obj, default=plain).encode()


def round_line(rec: RoundRecord) -> dict[str, Any]:
    """One ``rounds.jsonl`` line (and the "round done" log line) of a finished round."""
    return {
        "round": rec.round,
        "participants": list(rec.participants),
        "bytes_up": rec.bytes_up,
        "bytes_down": rec.bytes_down,
        "seconds": round(rec.finished_at - rec.opened_at, 3),
        **{k: v for k, v in rec.info.items() if k != "participants"},
    }


class AggregatorFiles:
    """Reads and writes the aggregator's state and outputs (no decisions)."""

    def __init__(self, checkpoint_dir: Path, out_dir: Path | None, *, run: str,
                 pending_limit: int) -> None:  # fmt: skip
        self.dir = checkpoint_dir
        self.out_dir = out_dir
        self.run = run
        self.pending_limit = pending_limit  # one aggregate: the transport's message bound

    def load_checkpoint(self, numel: int, settings_digest: str) -> CoordinatorState | None:
        """The checkpoint, or ``None`` when there is none (a fresh start)."""
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None
        data = read_bounded(path, checkpoint_limit(numel))
        try:
            return decode_checkpoint(data, run=self.run, settings_digest=settings_digest,
                                     numel=numel)  # fmt: skip
        except CheckpointError as exc:
            raise CheckpointError(exc.reason, f"cannot resume from {path}: {exc}") from None

    def save_checkpoint(self, state: CoordinatorState) -> None:
        atomic_write(self.dir / CHECKPOINT, encode_checkpoint(state))

    def load_pending(self) -> Pending | None:
        path = self.dir / PENDING
        if not path.exists():
            return None
        return decode_pending(read_bounded(path, self.pending_limit + 4096), run=self.run)

    def save_pending(self, pending: Pending) -> None:
        atomic_write(self.dir / PENDING, encode_pending(pending))

    def clear_pending(self) -> None:
        path = self.dir / PENDING
        try:
            if path.exists():
                path.unlink()
                fsync_dir(self.dir)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def save_outputs(self, round: int, params: np.ndarray, history: Iterable[RoundRecord]) -> None:
        """``global-<round>.npy`` and the whole ``rounds.jsonl``."""
        if self.out_dir is None:
            return
        buf = io.BytesIO()
        np.save(buf, params, allow_pickle=False)
        atomic_write(self.out_dir / f"global-{round}.npy", buf.getvalue(), mode=0o644)
        lines = b"".join(_json(round_line(r)) + b"\n" for r in history)
        atomic_write(self.out_dir / "rounds.jsonl", lines, mode=0o644)

    def save_json(self, name: str, obj: Mapping[str, Any]) -> None:
        if self.out_dir is not None:
            atomic_write(self.out_dir / name, _json(obj), mode=0o644)


Decision = Literal["resend", "reopen", "stale"]


def reconcile(
    *, run: str, round: int, attempt: int, pending: Pending | None, info: Mapping[str, Any]
) -> Decision:
    """What a restarted aggregator at (``round``, ``attempt``) does, given its pending
    aggregate and the key holder's ``status`` reply ``info``: ``resend`` the pending
    bytes, ``reopen`` the round for uploads, or (``stale``) drop a pending aggregate of
    a round already applied and re-open. :class:`ResumeRefused` when resuming would
    apply a round twice or skip one."""
    decision: Decision = "reopen"
    if pending is not None:
        if (pending.round, pending.attempt) < (round, attempt):
            decision = "stale"  # applied (or refused) before the crash; only not yet deleted
        elif (pending.round, pending.attempt) > (round, attempt):
            raise ResumeRefused(
                f"the pending aggregate is of round {pending.round} attempt {pending.attempt}, "
                f"ahead of the checkpoint (round {round} attempt {attempt}): the checkpoint "
                f"folder is damaged"
            )
        else:
            decision = "resend"
    last, digest = info.get("last_released"), info.get("released_digest")
    if not isinstance(last, int) or isinstance(last, bool):
        log.warning("the key holder's status names no last released round (an older key "
                    "holder): reconciliation unknown; %s", "re-sending the pending aggregate "
                    "(the key holder's once-only record refuses a different one)"
                    if decision == "resend" else f"re-opening round {round}")  # fmt: skip
        return decision
    note = {
        "resend": " with its aggregate pending",
        "reopen": "",
        "stale": " (its pending aggregate of an earlier round was applied)",
    }[decision]
    log.info("key holder: last released round of run %s is %d; checkpoint at round %d%s",
             run, last, round, note)  # fmt: skip
    if decision == "resend" and pending is not None:
        if last > round or (last == round and digest != pending.digest):
            raise ResumeRefused(
                f"the key holder released round {last} of run {run} with another aggregate "
                f"than the one this aggregator has pending for round {round}: refusing to "
                "resume (a round would be applied twice or from another cohort)"
            )
        return decision
    if last >= round:
        raise ResumeRefused(
            f"the key holder already released round {last} of run {run}, but this "
            f"aggregator's checkpoint is at round {round} and holds no pending aggregate "
            "for it: the checkpoint is older than the run (restore the newest one, or "
            "start a new run id)"
        )
    return decision


async def until_stop(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or ``None`` (``work`` cancelled) once ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


class Retry:
    """Capped exponential backoff that a stop signal cuts short."""

    def __init__(self, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.delay, self.max_s = initial_s, max_s
        self.attempts = 0

    async def pause(self, stop: asyncio.Event) -> bool:
        """Sleep the next delay; False when ``stop`` was set (do not retry)."""
        self.attempts += 1
        try:
            await asyncio.wait_for(stop.wait(), timeout=self.delay)
        except TimeoutError:
            self.delay = min(self.delay * 2, self.max_s)
            return True
        return False


def default_checkpoint_dir(kit_path: Path, out_dir: Path | None) -> Path:
    """``OUT/checkpoint`` with ``--out``, else ``KIT/state/aggregator``."""
    return out_dir / "checkpoint" if out_dir is not None else kit_path / "state" / "aggregator"


def request_limits(core: Coordinator) -> Callable[[str], int]:
    """Largest acceptable request per message type (the transport refuses the rest as
    it arrives): control messages are small; an upload is one encrypted update of
    ``core.layout`` under ``core.preset`` — a fresh ciphertext's measured size times the
    chunk count (packed presets: ``slots x lanes`` values per chunk, from the current
    plan, as ``QuantSpec.chunk_params``) — plus 10 % and 64 KiB for the signed statement
    and msgpack framing."""
    from secure_xfl.crypto.codec import chunk_lengths
    from secure_xfl.crypto.lanes import chunk_slots, fresh_chunk_bytes
    from secure_xfl.transport.limits import limits_table

    preset, numel = core.preset, core.layout.numel
    chunk = fresh_chunk_bytes(core.ctx, preset, core.plan.quant)

    def upload() -> int:
        q = core.plan.quant  # lanes follow the plan (they depend on the enrolment)
        n = len(chunk_lengths(numel, preset.slots) if q is None else chunk_slots(preset, q, numel))
        return int(n * chunk * 1.1) + (64 << 10)

    small = 16 << 10  # decline: reason and detail strings of ≤ 4096 bytes each
    return limits_table({"hello": small, "task": small, "decline": small, "upload": upload,
                         "mask_key": small, "cohort": small})  # fmt: skip
