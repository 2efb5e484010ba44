"""The key holder's append-only writer: sign, chain, fsync.

A failed append (full disk, file-size limit, I/O error) is truncated back to the size
before it and fsynced, so the file stays a valid ledger and the next append (once
space returns) continues the chain; only when that truncation fails too does the
writer refuse further appends until the ledger is reopened and re-verified.
"""

from __future__ import annotations

import copy
import fcntl
import math
import os
import stat
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from secure_xfl.crypto.dpspec import DEFAULT_DELTA
from secure_xfl.privacy.budget import PrivacyBudget
from secure_xfl.privacy.ledger.reader import _parse, _read_chunks
from secure_xfl.privacy.ledger.schema import (
    LEDGER_TYPE,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    LedgerError,
    LedgerInvalid,
    SigningKey,
    _check_curve,
    _sign,
    canonical_bytes,
    entry_hash,
    outcome_of,
    validate_entry,
)


class LedgerStorageError(LedgerError):
    """The ledger could not be written (full disk, file-size limit, I/O error, full
    ledger): nothing was appended, and a retry once space returns can succeed."""

    code = "storage_unavailable"


def _statement_list(statements: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts sorted by client, like ``participants``; validation comes later."""
    if isinstance(statements, str | bytes) or not isinstance(statements, Sequence):
        raise LedgerError("statements must be a list of {client, signed, cert} objects")
    items: list[dict[str, Any]] = []
    for item in statements:
        if not isinstance(item, Mapping) or not isinstance(item.get("client"), str):
            raise LedgerError("each statement must be an object with a client name")
        items.append(dict(item))
    return sorted(items, key=lambda item: str(item["client"]))


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerError(f"weight_scale must be a number, got {type(value).__name__}")
    return float(value)


def _claim(value: float | None) -> float | None:
    """An ε claim as written: ``None`` (JSON null) for unbounded."""
    if value is None or (isinstance(value, int | float) and value == math.inf):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerError(f"ε claims must be numbers, got {type(value).__name__}")
    return float(value)


def _now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class PrivacyLedger:
    """Append-only ledger owned by the key holder process.

    Opening verifies the existing file with the signing key's public half and
    refuses a broken one (including a torn last line left by a crash: an
    operator must look at it, since silently dropping it could hide a
    release). The file is created with mode 0600, locked exclusively
    (``flock``) while open, and fsynced after every append. Every decryption
    is recorded: a (run, round) takes any number of ``refused`` entries
    (validation failed, the plaintext was withheld) and then at most one
    ``released`` entry, mirroring the key holder's release-once rule. Refused
    entries are charged exactly like released ones (:meth:`budget`).
    """

    def __init__(self, path: str | os.PathLike[str], signing_key: SigningKey) -> None:
        if isinstance(signing_key, ec.EllipticCurvePrivateKey):
            _check_curve(signing_key)
        elif not isinstance(signing_key, ed25519.Ed25519PrivateKey):
            raise LedgerError("signing key must be Ed25519 or ECDSA P-256")
        self.path = Path(path)
        self._key = signing_key
        self._fd = self._open()
        try:
            # Statements are verified evidence for auditors; the key holder never
            # reads them again, so they are not kept in its (long-lived) memory.
            self._entries, self._head = _parse(
                _read_chunks(self._fd), signing_key.public_key(), keep_statements=False
            )
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise
        self._released: set[tuple[str, int]] = set()
        self._attempts: dict[tuple[str, int], int] = {}
        for e in self._entries:
            self._note(e)
        self._budgets: dict[tuple[str, float], PrivacyBudget] = {}
        self._broken = False

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, flags)
            except OSError as exc:
                raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
            created = False
        except OSError as exc:
            raise LedgerError(f"cannot create ledger {self.path}: {exc}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise LedgerError(f"{self.path} is not a regular file")
            if info.st_mode & 0o022:
                # Anyone else able to write could rewrite history undetectably
                # up to the last signature the auditor has seen.
                raise LedgerError(f"{self.path} is writable by group or others")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise LedgerError(f"{self.path} is in use by another process") from exc
            if created:
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _note(self, entry: Mapping[str, Any]) -> None:
        key = (entry["run"], entry["round"])
        if outcome_of(entry) == "released":
            self._released.add(key)
        else:
            self._attempts[key] = self._attempts.get(key, 0) + 1

    # -- lifecycle

    def close(self) -> None:
        """Release the lock and the file descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries

    @property
    def head(self) -> str:
        """Hex hash of the last line (:data:`GENESIS_PREV` when empty): publish
        it out of band to make truncation at the end detectable."""
        return self._head

    def __len__(self) -> int:
        return len(self._entries)

    def history(self, run: str | None = None) -> list[dict[str, Any]]:
        """Copies of all entries, or of one run's, in file order.

        They omit ``statements`` (verified when the ledger was opened or
        appended; :func:`~secure_xfl.privacy.ledger.read_ledger` returns them).
        """
        return [copy.deepcopy(e) for e in self._entries if run is None or e["run"] == run]

    def released(self, run: str, round: int) -> bool:
        """Whether a released entry of (``run``, ``round``) is on the ledger."""
        return (run, round) in self._released

    def attempts(self, run: str, round: int) -> int:
        """How many refused entries (``run``, ``round``) has."""
        return self._attempts.get((run, round), 0)

    def budget(self, run: str, delta: float = DEFAULT_DELTA) -> PrivacyBudget:
        """The :class:`PrivacyBudget` of ``run`` at ``delta`` from the recorded entries:
        every decryption, released or refused, is one Gaussian mechanism application.

        The caller gets its own copy; stepping it does not touch the ledger.
        """
        return self._budget(run, delta).copy()

    def _budget(self, run: str, delta: float) -> PrivacyBudget:
        key = (run, float(delta))
        cached = self._budgets.get(key)
        if cached is None:
            # Built once, then stepped on every append: the key holder asks for
            # ε several times a round and a rebuild costs rounds × participants.
            cached = self._budgets[key] = PrivacyBudget.from_entries(self._entries, run, delta)
        return cached

    def spent(self, run: str, delta: float) -> float:
        """ε spent by ``run`` so far at ``delta`` (federation view, RDP; refused
        decryptions included)."""
        return self._budget(run, delta).federation_epsilon()

    def would_spend(
        self, run: str, *, noise_multiplier: float, sample_rate: float, delta: float
    ) -> float:
        """Federation ε of ``run`` after one more decryption with these parameters
        (released or refused: both are charged)."""
        budget = self._budget(run, delta)
        # The federation figure does not depend on who took part; a placeholder
        # cohort keeps projected()'s participant check satisfied.
        fed, _, _ = budget.projected(noise_multiplier, sample_rate, ["-"])
        return fed

    # -- append

    def append(
        self,
        *,
        run: str,
        round: int,
        participants: Sequence[str],
        enrolled: int,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        rule: str,
        epsilon: float | None,
        dp_sgd: dict[str, Any] | None = None,
        statements: Sequence[Mapping[str, Any]] | None = None,
        weight_scale: float | None = None,
        outcome: str = "released",
        reason: str | None = None,
        client_epsilon: float | None = None,
        record_epsilon: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Sign, chain, write and fsync one entry; returns it (with ``sig``).

        ``epsilon`` is the federation claim after this decryption (``None`` or
        ``inf`` for unbounded); :meth:`would_spend` computes it.
        ``client_epsilon`` is the largest participant's ε after it (the second
        figure of :meth:`PrivacyBudget.projected`; ``inf`` for unbounded,
        ``None`` leaves the field out). ``record_epsilon`` maps participants to their
        record-level ε after it (``inf`` for unbounded). ``outcome`` is ``"released"`` or
        ``"refused"``; a refused entry needs ``reason``, a short identifier
        such as ``aggregate_out_of_bounds``. ``statements`` are the
        participants' signed statements ``{"client", "signed", "cert"}`` (see
        the schema's field table), one per participant; ``weight_scale`` the
        aggregator-side divisor of their weights. Raises
        :class:`LedgerError` when the entry is invalid, the (run, round) is
        already released (a second release, or a refusal after the release),
        the ledger is full, or an earlier write failed.
        """
        if self._fd < 0:
            raise LedgerError("ledger is closed")
        if self._broken:
            raise LedgerStorageError(
                "an earlier append failed and could not be undone; reopen the ledger to "
                "re-verify it"
            )
        people = sorted(participants)
        if isinstance(enrolled, int) and enrolled > 0 and people:
            realised = len(people) / enrolled
            if not math.isclose(float(sample_rate), realised, rel_tol=1e-9):
                raise LedgerError(
                    f"sample_rate {sample_rate} != participants/enrolled = {realised}"
                )
        eps = _claim(epsilon)
        entry: dict[str, Any] = {
            "type": LEDGER_TYPE,
            "seq": len(self._entries),
            "run": run,
            "round": round,
            "time": _now_utc(),
            "participants": people,
            "enrolled": enrolled,
            "clip_norm": float(clip_norm),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "delta": float(delta),
            "rule": rule,
            "epsilon": eps,
            "prev": self._head,
            "sig": "00",
        }
        if dp_sgd is not None:
            entry["dp_sgd"] = dict(dp_sgd)
        if statements is not None:
            entry["statements"] = _statement_list(statements)
        if weight_scale is not None:
            entry["weight_scale"] = _as_float(weight_scale)
        entry["outcome"] = outcome
        if reason is not None:
            entry["reason"] = reason
        if client_epsilon is not None:
            entry["client_epsilon"] = _claim(client_epsilon)
        if record_epsilon is not None:
            entry["record_epsilon"] = {str(c): _claim(e) for c, e in record_epsilon.items()}
        try:
            validate_entry(entry)
        except LedgerInvalid as exc:
            raise LedgerError(f"refusing to append: {exc.reason}") from exc
        if (run, round) in self._released:
            what = "released again" if outcome == "released" else "refused after its release"
            raise LedgerError(f"run {run!r} round {round} is already recorded as released; "
                              f"it cannot be {what}")  # fmt: skip
        del entry["sig"]
        entry["sig"] = _sign(self._key, canonical_bytes(entry))
        line = canonical_bytes(entry)
        if len(line) > MAX_LINE_BYTES:
            raise LedgerError(f"entry exceeds {MAX_LINE_BYTES} bytes")
        if self._size + len(line) + 1 > MAX_FILE_BYTES:
            raise LedgerStorageError("ledger is full; start a new ledger file for further runs")
        self._write(line + b"\n")
        slim = {k: v for k, v in entry.items() if k != "statements"}
        self._entries.append(copy.deepcopy(slim))
        for (budget_run, _), budget in self._budgets.items():
            if budget_run == run:
                budget.step(entry["noise_multiplier"], entry["sample_rate"], people)
        self._note(entry)
        self._head = entry_hash(line)
        return copy.deepcopy(entry)

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            why = f"ledger write failed: {exc.strerror or exc}"
            try:
                # Undo a partial line: the file is again the ledger as last verified.
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
            except OSError:
                # A partial line may be on disk; further appends would chain onto
                # state we cannot vouch for.
                self._broken = True
                raise LedgerStorageError(f"{why}; the partial line could not be undone") from exc
            raise LedgerStorageError(why) from exc
        self._size += len(data)
