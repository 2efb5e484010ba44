"""The key holder's durable record of decryptions: released rounds and refused attempts.

One JSON line per decryption, appended and fsynced before its outcome leaves the
process. A released (run, round) is never decrypted for another aggregate, across
restarts; its line keeps the SHA-256 of the released aggregate's encoding, so the
same aggregate sent again (a crash lost the reply) gets the same answer instead of a
burnt round. Lines written before digests were kept (no ``digest``) still load: such
a round simply has no repeat. A refused attempt (the aggregate failed validation
after decryption) keeps its round open for a retry with fresh noise, up to the
policy's limit of attempts.

A write that fails (full disk, file-size limit, I/O error) is truncated back to the
previous size and refused with reason ``storage_unavailable``: no torn line stays
behind to make the next start refuse (``state_corrupt``), and the round is not marked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import NoReturn

from secure_xfl.crypto.errors import DecryptionRefused
from secure_xfl.fsio import StorageError, fsync_dir, read_bounded

__all__ = ["MAX_STATE_BYTES", "DecryptionRecord"]

#: Bound on the decryption record file read at start-up.
MAX_STATE_BYTES = 64 * 1024 * 1024

_DIGEST = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger("secure_xfl.crypto.keyholder")


def _unavailable(detail: str) -> DecryptionRefused:
    """The refusal for a record that cannot be written: the round stays open."""
    return DecryptionRefused("storage_unavailable", detail)


class DecryptionRecord:
    """``state_dir/decrypted.jsonl`` under an exclusive lock."""

    def __init__(self, state_dir: Path) -> None:
        # A new state_dir is normal on a first start; one under the temp dir is the
        # mistake seen in practice (a fresh KeyHolder per round on a mkdtemp()).
        state = state_dir.absolute()
        temp = Path(tempfile.gettempdir()).resolve()
        if state.resolve().is_relative_to(temp):
            log.warning("state_dir %s lies under %s: decrypt-each-round-once does not "
                        "survive a temporary state_dir; keep one state_dir for the whole "
                        "run", state, temp)  # fmt: skip
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "decrypted.jsonl"
        # An exclusive lock: two key-holder processes on one state dir could
        # otherwise each decrypt the same round once.
        self._lock = open(state_dir / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise DecryptionRefused("state_locked", f"{state_dir} is in use") from None
        # (run, round) → hex digest of the released aggregate; None for old lines.
        self._released: dict[tuple[str, int], str | None] = {}
        self._last: dict[str, int] = {}
        self._refused: dict[tuple[str, int], int] = {}
        self._broken = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            text = read_bounded(self.path, MAX_STATE_BYTES).decode()
        except StorageError as exc:  # too large, or unreadable
            raise DecryptionRefused("state_corrupt", str(exc)) from None
        except UnicodeDecodeError:
            raise DecryptionRefused("state_corrupt", f"{self.path} is not UTF-8") from None
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rec = json.loads(line)
                key = (str(rec["run"]), int(rec["round"]))
                outcome = rec.get("outcome", "released")
                digest = rec.get("digest")
                if digest is not None and not (
                    isinstance(digest, str) and _DIGEST.fullmatch(digest)
                ):
                    raise ValueError("bad digest")
            except (ValueError, KeyError, TypeError, AttributeError):
                # A torn last line from a crash is still a decryption we cannot name;
                # refusing to start is the safe answer.
                raise DecryptionRefused("state_corrupt", f"line {n} of {self.path}") from None
            if outcome == "refused":
                self._refused[key] = self._refused.get(key, 0) + 1
            else:
                self._note_released(key, digest)

    def _note_released(self, key: tuple[str, int], digest: str | None) -> None:
        self._released[key] = digest
        run, round = key
        self._last[run] = max(self._last.get(run, -1), round)

    def released(self, run: str, round: int) -> bool:
        """Whether (run, round) was released before, across restarts."""
        return (run, round) in self._released

    def released_digest(self, run: str, round: int) -> str | None:
        """Hex SHA-256 of the aggregate released for (run, round); ``None`` when the
        round was not released or its line predates digests."""
        return self._released.get((run, round))

    def last_released(self, run: str) -> tuple[int, str]:
        """(highest released round of ``run``, its aggregate digest): ``(-1, "")`` when
        none was released, ``""`` for a line that predates digests."""
        last = self._last.get(run, -1)
        return last, (self._released.get((run, last)) or "") if last >= 0 else ""

    def refused(self, run: str, round: int) -> int:
        """Refused decryption attempts of (run, round) so far."""
        return self._refused.get((run, round), 0)

    def _append(self, rec: dict[str, object]) -> None:
        """Write and fsync one line, or leave the file exactly as it was."""
        if self._broken:
            raise _unavailable(f"an earlier write to {self.path} could not be undone; "
                               "restart the key holder to re-check the record")  # fmt: skip
        data = (json.dumps(rec) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise _unavailable(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        try:
            before = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise _unavailable(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if before == 0:
                fsync_dir(self.path.parent)  # a new file's name is durable too
        except OSError as exc:
            self._undo(fd, before, exc)
        finally:
            os.close(fd)

    def _undo(self, fd: int, size: int, exc: OSError) -> NoReturn:
        """Truncate a failed append back to ``size``, then refuse."""
        why = f"cannot write {self.path}: {exc.strerror or exc}"
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError:
            # A partial line may remain: the next start refuses (state_corrupt) so an
            # operator looks; until then nothing more is appended after it.
            self._broken = True
            raise _unavailable(why + " (and the partial write could not be undone)") from exc
        raise _unavailable(why) from exc

    def mark_released(self, run: str, round: int, digest: str | None = None) -> None:
        """Durably record a release (before the plaintext leaves the process), with the
        hex SHA-256 of the released aggregate's encoding."""
        rec: dict[str, object] = {"run": run, "round": round}
        if digest is not None:
            if not _DIGEST.fullmatch(digest):
                raise ValueError("digest must be 64 lower-case hex digits")
            rec["digest"] = digest
        self._append(rec)
        self._note_released((run, round), digest)

    def mark_refused(self, run: str, round: int, reason: str) -> None:
        """Durably record a decryption whose aggregate failed validation.

        Counted in memory first: a refusal that cannot be written (a full disk) still
        counts against ``max_attempts`` for as long as this process lives."""
        self._refused[(run, round)] = self.refused(run, round) + 1
        self._append({"run": run, "round": round, "outcome": "refused", "reason": reason})

    def close(self) -> None:
        """Release the lock."""
        self._lock.close()
