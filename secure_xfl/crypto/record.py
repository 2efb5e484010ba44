"""The key holder's durable record of decryptions: released rounds and refused attempts.

One JSON line per decryption, appended and fsynced before its outcome leaves the
process. A released (run, round) is never decrypted again, across restarts; a refused
attempt (the aggregate failed validation after decryption) keeps its round open for
a retry with fresh noise, up to the policy's limit of attempts.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from secure_xfl.crypto.errors import DecryptionRefused

__all__ = ["MAX_STATE_BYTES", "DecryptionRecord"]

#: Bound on the decryption record file read at start-up.
MAX_STATE_BYTES = 64 * 1024 * 1024


class DecryptionRecord:
    """``state_dir/decrypted.jsonl`` under an exclusive lock."""

    def __init__(self, state_dir: Path) -> None:
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
        self._released: set[tuple[str, int]] = set()
        self._refused: dict[tuple[str, int], int] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        if self.path.stat().st_size > MAX_STATE_BYTES:
            raise DecryptionRefused("state_corrupt", "decryption record is too large")
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                rec = json.loads(line)
                key = (str(rec["run"]), int(rec["round"]))
                outcome = rec.get("outcome", "released")
            except (ValueError, KeyError, TypeError):
                # A torn last line from a crash is still a decryption we cannot name;
                # refusing to start is the safe answer.
                raise DecryptionRefused("state_corrupt", f"line {n} of {self.path}") from None
            if outcome == "refused":
                self._refused[key] = self._refused.get(key, 0) + 1
            else:
                self._released.add(key)

    def released(self, run: str, round: int) -> bool:
        """Whether (run, round) was released before, across restarts."""
        return (run, round) in self._released

    def refused(self, run: str, round: int) -> int:
        """Refused decryption attempts of (run, round) so far."""
        return self._refused.get((run, round), 0)

    def _append(self, rec: dict[str, object]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def mark_released(self, run: str, round: int) -> None:
        """Durably record a release (before the plaintext leaves the process)."""
        self._append({"run": run, "round": round})
        self._released.add((run, round))

    def mark_refused(self, run: str, round: int, reason: str) -> None:
        """Durably record a decryption whose aggregate failed validation."""
        self._append({"run": run, "round": round, "outcome": "refused", "reason": reason})
        self._refused[(run, round)] = self.refused(run, round) + 1

    def close(self) -> None:
        """Release the lock."""
        self._lock.close()
