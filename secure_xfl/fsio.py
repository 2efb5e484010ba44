"""Crash-safe file writes: a file is either its old content or its new one, never half.

Every durable state file of the project (the silo's record-level account, the
aggregator's checkpoint, a client's last sealed upload, port files) goes through
:func:`atomic_write`: write a temporary file in the same directory, fsync it, rename
it over the target, fsync the directory. A failure at any step (a full disk, a
read-only mount) raises :class:`StorageError` and leaves the old file untouched and
no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from secure_xfl.errors import SecureXFLError

__all__ = ["StorageError", "atomic_write", "fsync_dir", "read_bounded"]


class StorageError(SecureXFLError):
    """A state file could not be written or read (full disk, permissions, too large)."""

    code = "storage_unavailable"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module doc)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, refusing a file larger than ``limit`` before reading it."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise StorageError(f"{path} is {size} bytes, more than the {limit} allowed")
            return fh.read(limit + 1)[:limit]
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
