"""A client's last sealed upload, kept durably so a re-opened round re-sends the same bytes.

When the aggregator restarts it re-opens the round that was collecting, with the same
(run, round, attempt) and the same plan digest, and asks every client for its update
again. A client that trained and sealed that plan already re-sends the SAME blob: no
retraining, no new record-level charge, no new noise. Sealing afresh would add a second,
independently noised copy of the same round; the key holder releases at most one
aggregate per round, so the round's ε is spent once either way, but re-sending keeps the
record-level account (charged before training) and the disclosed noise exactly as they
were. A client that lost the file, or is offered any other plan, trains afresh.

File format (``KIT/state/last-upload.bin``, written with :func:`fsio.atomic_write`)::

    MAGIC (8 bytes) | header length (4 bytes, big endian) | header (JSON) | blob

The header names the plan (run, round, attempt, plan digest), the round the blob is
signed for, what training reported, and the blob's length and SHA-256. Reading is
size-bounded, and a file that is truncated, oversized, garbled or not this client's own
(the blob must decode, match the header and carry this client's signature) is ignored
with one warning: it is a cache, never trusted blindly, and never a reason to stop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from secure_xfl.crypto import pki
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import ProtectedUpdate
from secure_xfl.crypto.recordspec import RecordDPFloor, RecordDPSpec
from secure_xfl.errors import SecureXFLError
from secure_xfl.fsio import StorageError, atomic_write, read_bounded
from secure_xfl.protocol.client import Trained
from secure_xfl.protocol.plan import RoundPlan

__all__ = ["CACHE_FILE", "CachedUpload", "UploadCacheError", "load_upload", "save_upload"]

log = logging.getLogger("secure_xfl.client")

CACHE_FILE = "last-upload.bin"
MAGIC = b"SXFLUPL1"
_HEADER_MAX = 64 << 10
_PREFIX = struct.Struct(">8sI")
_KEYS = {"run", "round", "attempt", "plan_digest", "target", "trained", "blob_bytes", "sha256"}


class UploadCacheError(SecureXFLError):
    """The cached upload file is unusable (why it was ignored)."""

    code = "upload_cache_invalid"


@dataclass(frozen=True)
class CachedUpload:
    """One sealed upload and the plan it answers."""

    run: str
    """Run id of the plan."""
    round: int
    """The plan's round (the update's base round)."""
    attempt: int
    """The plan's attempt (a re-opened round after a refused decryption is a new one)."""
    plan_digest: bytes
    """Digest of the plan the update was trained and signed under."""
    target: int
    """Round the blob is signed for (the plan's round unless it was re-targeted)."""
    trained: Trained
    """What local training reported (fed back to the state machine instead of training)."""
    blob: bytes
    """The encoded :class:`ProtectedUpdate`, exactly as uploaded."""

    def matches(self, plan: RoundPlan) -> bool:
        """Whether ``plan`` is the very plan this upload answers."""
        return (self.run, self.round, self.attempt, self.plan_digest) == (
            plan.run,
            plan.round,
            plan.attempt,
            plan.digest,
        )

    def fits(self, dp: DPSpec | None, record: RecordDPFloor | None) -> bool:
        """Whether the sealed update meets this client's own DP for the plan today (the
        kit may have been tightened since it was sealed)."""
        st = ProtectedUpdate.decode(self.blob).statement
        if st.dp != dp:
            return False
        if record is None:
            return True
        return st.record is not None and not st.record.weaker_than(record)

    def encode(self) -> bytes:
        """The file's bytes."""
        t = self.trained
        header = {
            "run": self.run,
            "round": self.round,
            "attempt": self.attempt,
            "plan_digest": self.plan_digest.hex(),
            "target": self.target,
            "trained": {
                "num_samples": t.num_samples,
                "loss": t.loss,
                "throughput": t.throughput,
                "record": None if t.record is None else t.record.to_wire(),
            },
            "blob_bytes": len(self.blob),
            "sha256": hashlib.sha256(self.blob).hexdigest(),
        }
        body = json.dumps(header, sort_keys=True, allow_nan=False).encode()
        return _PREFIX.pack(MAGIC, len(body)) + body + self.blob


def _int(obj: dict[str, Any], key: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
        raise UploadCacheError(f"{key} must be a non-negative int")
    return v


def _opt_float(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise UploadCacheError(f"trained.{key} must be a finite number or null")
    return float(v)


def _trained(obj: object) -> Trained:
    if not isinstance(obj, dict) or set(obj) != {"num_samples", "loss", "throughput", "record"}:
        raise UploadCacheError("trained must have num_samples, loss, throughput and record")
    record = None if obj["record"] is None else RecordDPSpec.from_wire(obj["record"])
    return Trained(_int(obj, "num_samples"), _opt_float(obj, "loss"),
                   _opt_float(obj, "throughput"), record)  # fmt: skip


def decode_upload(data: bytes, *, client: str, cert: x509.Certificate) -> CachedUpload:
    """Parse and check a cache file's bytes (raises :class:`UploadCacheError`)."""
    if len(data) < _PREFIX.size:
        raise UploadCacheError("truncated before its header")
    magic, size = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise UploadCacheError("not a secure-xfl upload cache (bad magic)")
    if size > _HEADER_MAX or _PREFIX.size + size > len(data):
        raise UploadCacheError(f"header of {size} bytes is too large or truncated")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + size])
    except ValueError as exc:
        raise UploadCacheError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != _KEYS:
        raise UploadCacheError(f"header must have exactly the keys {sorted(_KEYS)}")
    blob = data[_PREFIX.size + size :]
    if len(blob) != header["blob_bytes"] or hashlib.sha256(blob).hexdigest() != header["sha256"]:
        raise UploadCacheError(f"blob is {len(blob)} bytes or its SHA-256 differs (truncated?)")
    run, digest = header["run"], header["plan_digest"]
    if not isinstance(run, str) or not isinstance(digest, str):
        raise UploadCacheError("run and plan_digest must be strings")
    try:
        up = CachedUpload(
            run=run, round=_int(header, "round"), attempt=_int(header, "attempt"),
            plan_digest=bytes.fromhex(digest), target=_int(header, "target"),
            trained=_trained(header["trained"]), blob=blob,
        )  # fmt: skip
        update = ProtectedUpdate.decode(blob)
        st = update.statement
        pki.verify_signature(cert, update.signed.signature, st.signing_bytes())
    except UploadCacheError:
        raise
    except (SecureXFLError, ValueError) as exc:
        raise UploadCacheError(f"the sealed update does not check: {exc}") from None
    signed = (st.client, st.run, st.base_round, st.round, st.plan_digest, st.record)
    if signed != (client, up.run, up.round, up.target, up.plan_digest, up.trained.record):
        raise UploadCacheError("the sealed update's statement does not match its header")
    return up


def load_upload(
    state_dir: Path, *, client: str, cert: x509.Certificate, limit: int
) -> CachedUpload | None:
    """The cached upload of this client, or ``None`` (absent, or ignored with a warning)."""
    path = state_dir / CACHE_FILE
    if not path.exists():
        return None
    try:
        return decode_upload(
            read_bounded(path, limit + _PREFIX.size + _HEADER_MAX), client=client, cert=cert
        )
    except (UploadCacheError, StorageError) as exc:
        log.warning("ignoring the cached upload %s: %s (a re-opened round is retrained)",
                    path, exc)  # fmt: skip
        return None


def save_upload(state_dir: Path, upload: CachedUpload) -> bool:
    """Replace the cached upload durably; on a storage fault warn and return False (the
    upload still goes out; only a restart would then retrain instead of re-sending)."""
    try:
        atomic_write(state_dir / CACHE_FILE, upload.encode())
    except StorageError as exc:
        log.warning("cannot keep the sealed upload for a re-opened round: %s", exc)
        return False
    return True
