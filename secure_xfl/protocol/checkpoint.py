"""The aggregator's checkpoint: what a restarted aggregator needs to continue its run.

Bytes in, bytes out: this module defines the format and validates it; the service
(:mod:`secure_xfl.services.aggregator_state`) reads and writes the files, through
:func:`secure_xfl.fsio.atomic_write` and size-bounded reads.

**Checkpoint** (``state.npz``): one uncompressed ``.npz`` (``allow_pickle=False``),
so a single atomic rename commits the whole state. Member ``state`` is UTF-8 JSON
(format tag and version, run id, settings digest, round, attempt, phase and
outcome, loss_ref, throughputs, history, refused cohorts, the recent round plans
as hex msgpack, and a SHA-256 over the arrays); ``params`` is the flat float64
global model; ``rule.<name>`` are the server optimiser's arrays. A checkpoint of
another run, of other settings (kit, preset, rule, model layout), of another
format version, larger than its bound, or whose bytes do not match its digest is
refused with :class:`CheckpointError` naming why.

**Pending aggregate** (``pending.bin``): a magic line, one JSON header line (run,
round, attempt, SHA-256 and length of the blob), then the exact encoded
:class:`~secure_xfl.crypto.envelope.EncryptedAggregate` bytes sent to the key
holder, so a restart re-sends the very same bytes (same digest: the key holder's
idempotent release answers it again without charging anything).

**ε accounting of a re-opened round.** The checkpoint holds no accumulator: a round
that was collecting when the aggregator died is re-opened as the same (round,
attempt) with the same plan digest (the plan is a pure function of the restored
state). Nothing of the lost incarnation was released: the key holder never saw its
aggregate, so no ε was charged for it. A client that still holds its sealed upload
re-sends the same signed ciphertext: no new noise, nothing new released. A client
that lost it retrains with fresh noise, charged by its own silo account (record
level) — the round's client-level release still happens at most once, since the key
holder releases at most one aggregate per (run, round); the ledger therefore holds
one line per round and the federation ε counts the round once. A round whose
aggregate was already sent (``pending.bin``) is not re-opened: the same bytes are
re-sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np
import torch

from secure_xfl.crypto.codec import layout_of
from secure_xfl.errors import TrainingError
from secure_xfl.protocol.events import RoundRecord
from secure_xfl.protocol.messages import ProtocolError
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.protocol.proposal import CoordinatorSettings
from secure_xfl.wire import bounded_unpack

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "CoordinatorState",
    "Pending",
    "checkpoint_limit",
    "decode_checkpoint",
    "decode_pending",
    "encode_checkpoint",
    "encode_pending",
    "model_layout",
    "settings_digest",
]

FORMAT = "secure-xfl/aggregator-checkpoint"
VERSION = 1
PENDING_MAGIC = b"secure-xfl/pending-aggregate/v1\n"
_JSON_LIMIT = 64 << 20  # history of many rounds, plans, throughputs of many clients
_HEADER_LIMIT = 4096


class CheckpointError(TrainingError):
    """A checkpoint or pending aggregate cannot be used; ``reason`` says why
    (``corrupt``, ``version``, ``foreign_run``, ``settings_changed``, ``too_large``,
    ``mismatch``)."""

    code = "checkpoint_invalid"

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class CoordinatorState:
    """A snapshot of a :class:`~secure_xfl.protocol.coordinator.Coordinator` between
    rounds (taken when a round is open, before any of its uploads count)."""

    run: str
    """Run id."""
    settings_digest: str
    """:func:`settings_digest` of the coordinator that took it."""
    round: int
    """The open (or, once finished, the next) round."""
    attempt: int
    """Attempt of that round (re-opened after refused aggregates)."""
    phase: Literal["collecting", "finished"]
    """``finished``: the run is over (``outcome``, ``ok``)."""
    params: np.ndarray
    """Flat float64 global parameters."""
    rule_state: dict[str, np.ndarray] = field(default_factory=dict)
    """:meth:`AggregationRule.state` (server-optimiser moments)."""
    loss_ref: float | None = None
    """Public reference loss of dynamic weighting."""
    throughputs: dict[str, float] = field(default_factory=dict)
    """Partition state: measured samples/s per client."""
    history: tuple[RoundRecord, ...] = ()
    """Released rounds."""
    refused_cohorts: tuple[str, ...] = ()
    """Cohorts whose aggregate the key holder refused as invalid."""
    plans: dict[int, RoundPlan] = field(default_factory=dict)
    """Recent plans by round (buffered async checks stale updates against them)."""
    outcome: str = ""
    """Why the run finished."""
    ok: bool = False
    """Whether it finished well."""
    budget_exhausted: bool = False
    """Whether it stopped at the privacy budget."""


@dataclass(frozen=True)
class Pending:
    """An aggregate handed to the key holder and not yet applied."""

    run: str
    """Run id."""
    round: int
    """Round of the aggregate."""
    attempt: int
    """Attempt of that round."""
    aggregate: bytes
    """Encoded EncryptedAggregate, exactly as sent."""

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of :attr:`aggregate`: what the key holder records as released."""
        return hashlib.sha256(self.aggregate).hexdigest()


def _plain(value: object) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | frozenset | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not checkpointable")


def settings_digest(
    settings: CoordinatorSettings, *, preset: str, rule: str, rule_lr: float, layout: bytes
) -> str:
    """SHA-256 over everything the restored state must agree with: the settings (from
    the kit), the CKKS preset, the rule and its learning rate, the model's layout."""
    body = {"settings": asdict(settings), "preset": preset, "rule": rule, "lr": rule_lr,
            "layout": layout.hex()}  # fmt: skip
    text = json.dumps(body, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()


def model_layout(model: Mapping[str, np.ndarray]) -> tuple[bytes, int]:
    """(layout digest, parameter count) of a model, as the coordinator flattens it."""
    layout = layout_of({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.items()})
    return layout.digest, layout.numel


def checkpoint_limit(numel: int) -> int:
    """Largest checkpoint file accepted for a model of ``numel`` parameters: params and
    at most two optimiser moments in float64, the JSON, and zip/npy framing."""
    return 3 * 8 * numel + _JSON_LIMIT + (1 << 20)


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name], dtype="<f8")
        h.update(f"{name}:{arr.shape}\0".encode() + arr.tobytes())
    return h.hexdigest()


def _record_json(rec: RoundRecord) -> dict[str, Any]:
    return asdict(rec)


def encode_checkpoint(state: CoordinatorState) -> bytes:
    """The ``state.npz`` bytes of ``state``."""
    arrays = {"params": np.ascontiguousarray(state.params, dtype="<f8")}
    arrays.update({f"rule.{k}": np.ascontiguousarray(v, dtype="<f8")
                   for k, v in state.rule_state.items()})  # fmt: skip
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "run": state.run,
        "settings_digest": state.settings_digest,
        "round": state.round,
        "attempt": state.attempt,
        "phase": state.phase,
        "outcome": state.outcome,
        "ok": state.ok,
        "budget_exhausted": state.budget_exhausted,
        "loss_ref": state.loss_ref,
        "throughputs": state.throughputs,
        "history": [_record_json(r) for r in state.history],
        "refused_cohorts": list(state.refused_cohorts),
        "plans": {
            str(r): msgpack.packb(p.to_wire(), use_bin_type=True).hex()
            for r, p in state.plans.items()
        },
        "arrays": _arrays_digest(arrays),
    }
    text = json.dumps(meta, sort_keys=True, default=_plain).encode()
    buf = io.BytesIO()
    np.savez(buf, state=np.frombuffer(text, dtype=np.uint8), **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _get(meta: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = meta.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError("corrupt", f"field {key!r} is missing or of the wrong type")
    return value


def _record(obj: object) -> RoundRecord:
    if not isinstance(obj, dict):
        raise CheckpointError("corrupt", "a history entry is not an object")
    try:
        return RoundRecord(
            round=int(obj["round"]),
            opened_at=float(obj["opened_at"]),
            closed_at=float(obj["closed_at"]),
            finished_at=float(obj["finished_at"]),
            participants=tuple(str(p) for p in obj["participants"]),
            bytes_up=int(obj["bytes_up"]),
            bytes_down=int(obj["bytes_down"]),
            info=dict(obj["info"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError("corrupt", f"history entry: {exc!r}") from None


def _plan(hex_text: object) -> RoundPlan:
    try:
        raw = bytes.fromhex(str(hex_text))
        obj = bounded_unpack(raw, error=ProtocolError, what="plan", max_bin_len=1024,
                             max_str_len=1024, max_array_len=64, max_map_len=64)  # fmt: skip
        return RoundPlan.from_wire(obj)
    except (ValueError, ProtocolError) as exc:
        raise CheckpointError("corrupt", f"stored plan: {exc}") from None


def _open_npz(data: bytes, limit: int) -> dict[str, np.ndarray]:
    if len(data) > limit:
        raise CheckpointError("too_large", f"{len(data)} bytes, more than the {limit} allowed")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if sum(i.file_size for i in zf.infolist()) > limit:  # no zip bomb either
                raise CheckpointError("too_large", "members expand beyond the bound")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile, numpy and OS errors of a damaged file
        raise CheckpointError("corrupt", f"not a readable checkpoint ({exc})") from None


def decode_checkpoint(
    data: bytes, *, run: str, settings_digest: str, numel: int, limit: int | None = None
) -> CoordinatorState:
    """Parse and check a checkpoint for this run, these settings and ``numel`` params
    (``limit``: bytes accepted, by default :func:`checkpoint_limit`)."""
    arrays = _open_npz(data, checkpoint_limit(numel) if limit is None else limit)
    raw = arrays.pop("state", None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError("corrupt", "no state member")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError("corrupt", f"state is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError("corrupt", "not an aggregator checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError("version", f"format version {meta.get('version')!r}, "
                              f"this aggregator reads {VERSION}")  # fmt: skip
    if meta.get("run") != run:
        raise CheckpointError("foreign_run", f"checkpoint of run {meta.get('run')!r}, "
                              f"this kit's run is {run!r}")  # fmt: skip
    if meta.get("settings_digest") != settings_digest:
        raise CheckpointError("settings_changed", "the kit's settings, preset, rule or model "
                              "differ from those the checkpoint was written with")  # fmt: skip
    if any(a.dtype != np.float64 or a.ndim != 1 for a in arrays.values()):
        raise CheckpointError("corrupt", "arrays must be flat float64")
    if _arrays_digest(arrays) != meta.get("arrays"):
        raise CheckpointError("corrupt", "array digest mismatch")
    params = arrays.pop("params", None)
    if params is None or params.shape != (numel,):
        raise CheckpointError("mismatch", f"params must hold {numel} values")
    phase = _get(meta, "phase", str)
    if phase not in ("collecting", "finished"):
        raise CheckpointError("corrupt", f"phase {phase!r}")
    loss_ref = meta.get("loss_ref")
    throughputs = _get(meta, "throughputs", dict)
    try:
        plans = {int(r): _plan(p) for r, p in _get(meta, "plans", dict).items()}
        tput = {str(k): float(v) for k, v in throughputs.items()}
    except ValueError as exc:
        raise CheckpointError("corrupt", f"plans or throughputs: {exc}") from None
    return CoordinatorState(
        run=run,
        settings_digest=settings_digest,
        round=_get(meta, "round", int),
        attempt=_get(meta, "attempt", int),
        phase=phase,
        params=params.astype(np.float64),
        rule_state={k.removeprefix("rule."): v for k, v in arrays.items()},
        loss_ref=None if loss_ref is None else float(_get(meta, "loss_ref", (int, float))),
        throughputs=tput,
        history=tuple(_record(r) for r in _get(meta, "history", list)),
        refused_cohorts=tuple(str(c) for c in _get(meta, "refused_cohorts", list)),
        plans=plans,
        outcome=_get(meta, "outcome", str),
        ok=_get(meta, "ok", bool),
        budget_exhausted=_get(meta, "budget_exhausted", bool),
    )


def encode_pending(p: Pending) -> bytes:
    """The ``pending.bin`` bytes of ``p``."""
    header = {"run": p.run, "round": p.round, "attempt": p.attempt, "sha256": p.digest,
              "length": len(p.aggregate)}  # fmt: skip
    return PENDING_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + p.aggregate


def decode_pending(data: bytes, *, run: str) -> Pending:
    """Parse ``pending.bin`` (already size-bounded by the reader) and check its digest."""
    if not data.startswith(PENDING_MAGIC):
        raise CheckpointError("corrupt", "pending aggregate: bad magic")
    rest = data[len(PENDING_MAGIC) :]
    line, sep, blob = rest.partition(b"\n")
    if not sep or len(line) > _HEADER_LIMIT:
        raise CheckpointError("corrupt", "pending aggregate: no header")
    try:
        head = json.loads(line)
    except ValueError:
        raise CheckpointError("corrupt", "pending aggregate: header is not JSON") from None
    if not isinstance(head, dict):
        raise CheckpointError("corrupt", "pending aggregate: header is not an object")
    if head.get("run") != run:
        raise CheckpointError("foreign_run", f"pending aggregate of run {head.get('run')!r}")
    pending = Pending(run, _get(head, "round", int), _get(head, "attempt", int), blob)
    if head.get("length") != len(blob) or head.get("sha256") != pending.digest:
        raise CheckpointError("corrupt", "pending aggregate: length or digest mismatch")
    return pending
