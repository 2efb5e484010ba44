"""Versioned binary envelopes (msgpack) for protected updates and aggregates.

A client signs an :class:`UpdateStatement` — run, round, its id, the layout and
preset, its weight and the SHA-256 of its ciphertext chunks — so the key holder
can later check who contributed to an aggregate without ever seeing an
individual ciphertext. Parsing is strict: msgpack's own limits bound every
length before allocation, then every field is type- and range-checked.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import msgpack

from secure_xfl.crypto.cohort import MaskClaim
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.errors import EnvelopeError
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.wire import bounded_unpack

ENVELOPE_VERSION = 1
#: Domain separation tag for the signed statement. v1 (10 fields) and v2 (11, with a
#: quantisation) named no plan, base model or DP spec; v3 (15) named no record-level
#: DP; v4 (16) named no mask cohort. They are refused, so no old signature can be read
#: as covering a DP spec or a cohort it never named.
STATEMENT_DOMAIN = "secure-xfl/update-statement/v5"
STATEMENT_FIELDS = 17

#: Hard caps applied before any allocation.
MAX_ENVELOPE_BYTES = 2 * 1024**3
MAX_CHUNK_BYTES = 4 * 1024 * 1024
MAX_CHUNKS = 1_000_000
MAX_ID_LEN = 128
MAX_SIGNATURE_BYTES = 512
MAX_MANIFEST_ENTRIES = 100_000

Weighting = Literal["aggregator", "client"]
_WEIGHTINGS = ("aggregator", "client")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise EnvelopeError(f"{field} must match {_ID_RE.pattern}")
    return value


def _check_int(value: object, field: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise EnvelopeError(f"{field} must be an integer in [{lo}, {hi}]")
    return value


def _check_float(value: object, field: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EnvelopeError(f"{field} must be a number")
    f = float(value)
    if not math.isfinite(f) or (positive and f <= 0):
        raise EnvelopeError(f"{field} must be finite{' and > 0' if positive else ''}")
    return f


def _check_bytes(value: object, field: str, lo: int, hi: int) -> bytes:
    if not isinstance(value, bytes) or not lo <= len(value) <= hi:
        raise EnvelopeError(f"{field} must be {lo}..{hi} bytes")
    return value


def ciphertext_digest(chunks: Sequence[bytes]) -> bytes:
    """SHA-256 over the chunks, length-prefixed so boundaries cannot shift."""
    h = hashlib.sha256(b"secure-xfl/ciphertext/v1\0")
    h.update(len(chunks).to_bytes(8, "big"))
    for c in chunks:
        h.update(len(c).to_bytes(8, "big"))
        h.update(c)
    return h.digest()


@dataclass(frozen=True)
class UpdateStatement:
    """What a client signs about one protected update."""

    run: str
    """Run id: updates of another run are refused."""
    round: int
    """Round number: replays from other rounds are refused."""
    client: str
    """Client name (its certificate's identity)."""
    layout_digest: bytes
    """Digest of the tensor layout the ciphertext encodes."""
    preset: str
    """CKKS preset name."""
    numel: int
    """Elements in the flat vector."""
    weight: float
    """Positive aggregation weight (sample count, e^-loss, or a pre-applied factor)."""
    weighting: Weighting
    """``aggregator``: the aggregator multiplies by ``weight``; ``client``: already applied."""
    ciphertext_digest: bytes
    """:func:`ciphertext_digest` of the chunks."""
    loss: float | None
    """Reported training loss (dynamic weighting), if any."""
    quant: QuantSpec | None
    """Quantisation of a packed update (``None`` for ordinary CKKS updates)."""
    plan_digest: bytes
    """SHA-256 of the round plan the client accepted (``RoundPlan.digest``)."""
    base_round: int
    """Round whose global model the client trained from (``round`` except in buffered
    asynchronous runs, where a straggler re-targets a newer round)."""
    base_model_digest: bytes
    """Digest of the global model the client trained from."""
    dp: DPSpec | None
    """The client-level differential privacy applied to this update (``None``: none)."""
    record: RecordDPSpec | None = None
    """The record-level DP-SGD the client ran for this update (``None``: none)."""
    mask: MaskClaim | None = None
    """The cohort whose pairwise masks this packed update carries (``None``: unmasked)."""

    def to_wire(self) -> list[Any]:
        """Positional form, also the exact bytes that are signed (after the domain tag)."""
        return [
            self.run,
            self.round,
            self.client,
            self.layout_digest,
            self.preset,
            self.numel,
            self.weight,
            self.weighting,
            self.ciphertext_digest,
            self.loss,
            None if self.quant is None else self.quant.to_wire(),
            self.plan_digest,
            self.base_round,
            self.base_model_digest,
            None if self.dp is None else self.dp.to_wire(),
            None if self.record is None else self.record.to_wire(),
            None if self.mask is None else self.mask.to_wire(),
        ]

    def signing_bytes(self) -> bytes:
        """Canonical bytes covered by the client's signature."""
        return bytes(msgpack.packb([STATEMENT_DOMAIN, *self.to_wire()], use_bin_type=True))

    @classmethod
    def from_wire(cls, obj: object) -> UpdateStatement:
        """Validate the positional form (v5: 17 fields)."""
        if not isinstance(obj, list) or len(obj) != STATEMENT_FIELDS:
            n = len(obj) if isinstance(obj, list) else type(obj).__name__
            raise EnvelopeError(
                f"statement must be a v5 list of {STATEMENT_FIELDS} fields, got {n} "
                "(v1–v4 statements name no plan, DP, record-level DP or mask cohort and "
                "are refused)"
            )
        run, rnd, client, layout, preset, numel, weight, weighting, ctd, loss = obj[:10]
        quant, plan, base_round, base_model, dp, record, mask = obj[10:]
        if weighting not in _WEIGHTINGS:
            raise EnvelopeError(f"weighting must be one of {_WEIGHTINGS}")
        rnd = _check_int(rnd, "round", 0, 2**31)
        base_round = _check_int(base_round, "base_round", 0, 2**31)
        if base_round > rnd:
            raise EnvelopeError("base_round must not exceed round")
        return cls(
            run=_check_id(run, "run"),
            round=rnd,
            client=_check_id(client, "client"),
            layout_digest=_check_bytes(layout, "layout_digest", 32, 32),
            preset=_check_id(preset, "preset"),
            numel=_check_int(numel, "numel", 1, 2**31),
            weight=_check_float(weight, "weight", positive=True),
            weighting=weighting,
            ciphertext_digest=_check_bytes(ctd, "ciphertext_digest", 32, 32),
            loss=None if loss is None else _check_float(loss, "loss"),
            quant=None if quant is None else QuantSpec.from_wire(quant),
            plan_digest=_check_bytes(plan, "plan_digest", 32, 32),
            base_round=base_round,
            base_model_digest=_check_bytes(base_model, "base_model_digest", 32, 32),
            dp=None if dp is None else DPSpec.from_wire(dp),
            record=None if record is None else RecordDPSpec.from_wire(record),
            mask=None if mask is None else MaskClaim.from_wire(mask),
        )


@dataclass(frozen=True)
class SignedStatement:
    """A statement with the client's signature: one manifest entry."""

    statement: UpdateStatement
    """What was signed."""
    signature: bytes
    """Signature by the client's key over :meth:`UpdateStatement.signing_bytes`."""

    def to_wire(self) -> list[Any]:
        """Positional form."""
        return [self.statement.to_wire(), self.signature]

    @classmethod
    def from_wire(cls, obj: object) -> SignedStatement:
        """Validate the positional form."""
        if not isinstance(obj, list) or len(obj) != 2:
            raise EnvelopeError("signed statement must be [statement, signature]")
        return cls(
            UpdateStatement.from_wire(obj[0]),
            _check_bytes(obj[1], "signature", 1, MAX_SIGNATURE_BYTES),
        )


def _unpack(data: bytes, kind: str) -> list[Any]:
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"{kind} must be bytes of at most {MAX_ENVELOPE_BYTES}")
    obj = bounded_unpack(
        data,
        error=EnvelopeError,
        what=kind,
        max_bin_len=MAX_CHUNK_BYTES,
        max_str_len=4096,
        max_array_len=max(MAX_CHUNKS, MAX_MANIFEST_ENTRIES),
        max_map_len=64,
    )
    if not isinstance(obj, list) or len(obj) < 2 or obj[0] != kind:
        raise EnvelopeError(f"not a {kind} envelope")
    if obj[1] != ENVELOPE_VERSION:
        shown = repr(obj[1])[:64] if isinstance(obj[1], int | str) else type(obj[1]).__name__
        raise EnvelopeError(f"unsupported {kind} version {shown}")
    return obj


def _check_chunks(value: object, field: str) -> list[bytes]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHUNKS:
        raise EnvelopeError(f"{field} must be a list of 1..{MAX_CHUNKS} chunks")
    return [_check_bytes(c, field, 1, MAX_CHUNK_BYTES) for c in value]


@dataclass(frozen=True)
class ProtectedUpdate:
    """A client's encrypted, signed update as sent to the aggregator."""

    signed: SignedStatement
    """Statement and signature."""
    chunks: tuple[bytes, ...]
    """Serialised CKKS ciphertexts, in layout order."""

    @property
    def statement(self) -> UpdateStatement:
        """Shortcut to the signed statement."""
        return self.signed.statement

    def encode(self) -> bytes:
        """Serialise to the versioned wire format."""
        body = ["update", ENVELOPE_VERSION, self.signed.to_wire(), list(self.chunks)]
        return bytes(msgpack.packb(body, use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> ProtectedUpdate:
        """Parse and validate; the ciphertext digest must match the chunks."""
        obj = _unpack(data, "update")
        if len(obj) != 4:
            raise EnvelopeError("update envelope must have 4 fields")
        signed = SignedStatement.from_wire(obj[2])
        chunks = tuple(_check_chunks(obj[3], "chunks"))
        if ciphertext_digest(chunks) != signed.statement.ciphertext_digest:
            raise EnvelopeError("ciphertext digest does not match the chunks")
        return cls(signed, chunks)


@dataclass(frozen=True)
class EncryptedAggregate:
    """A weighted sum of updates on ciphertexts plus what the key holder must check."""

    run: str
    """Run id."""
    round: int
    """Round number."""
    layout_digest: bytes
    """Layout of the summed vectors."""
    preset: str
    """CKKS preset name."""
    numel: int
    """Elements in the flat vector."""
    weighting: Weighting
    """How weights were applied (see :class:`UpdateStatement`)."""
    weight_scale: float
    """Aggregator-side factor: client i was multiplied by ``weight_i / weight_scale``."""
    chunks: tuple[bytes, ...]
    """Serialised summed ciphertexts."""
    manifest: tuple[SignedStatement, ...]
    """Every contributing client's signed statement."""

    def encode(self) -> bytes:
        """Serialise to the versioned wire format."""
        body = [
            "aggregate",
            ENVELOPE_VERSION,
            self.run,
            self.round,
            self.layout_digest,
            self.preset,
            self.numel,
            self.weighting,
            self.weight_scale,
            list(self.chunks),
            [s.to_wire() for s in self.manifest],
        ]
        return bytes(msgpack.packb(body, use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> EncryptedAggregate:
        """Parse and validate."""
        obj = _unpack(data, "aggregate")
        if len(obj) != 11:
            raise EnvelopeError("aggregate envelope must have 11 fields")
        _, _, run, rnd, layout, preset, numel, weighting, scale, chunks, manifest = obj
        if weighting not in _WEIGHTINGS:
            raise EnvelopeError(f"weighting must be one of {_WEIGHTINGS}")
        if not isinstance(manifest, list) or not 1 <= len(manifest) <= MAX_MANIFEST_ENTRIES:
            raise EnvelopeError(f"manifest must list 1..{MAX_MANIFEST_ENTRIES} entries")
        return cls(
            run=_check_id(run, "run"),
            round=_check_int(rnd, "round", 0, 2**31),
            layout_digest=_check_bytes(layout, "layout_digest", 32, 32),
            preset=_check_id(preset, "preset"),
            numel=_check_int(numel, "numel", 1, 2**31),
            weighting=weighting,
            weight_scale=_check_float(scale, "weight_scale", positive=True),
            chunks=tuple(_check_chunks(chunks, "chunks")),
            manifest=tuple(SignedStatement.from_wire(m) for m in manifest),
        )

    def without_chunks(self) -> EncryptedAggregate:
        """Copy for logging or bookkeeping without the ciphertext payload."""
        return replace(self, chunks=())
