"""Reading and verifying a whole ledger image (signatures, chain, canonical form)."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from secure_xfl.privacy.ledger.schema import (
    GENESIS_PREV,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    VerifyKey,
    _fail,
    _verify,
    canonical_bytes,
    entry_hash,
    load_verify_key,
    validate_entry,
)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse(data: bytes, key: VerifyKey) -> tuple[list[dict[str, Any]], str]:
    """Verify a whole ledger image; returns its entries and head hash."""
    if len(data) > MAX_FILE_BYTES:
        raise _fail(f"ledger exceeds {MAX_FILE_BYTES} bytes", 0)
    if not data:
        return [], GENESIS_PREV
    if not data.endswith(b"\n"):
        raise _fail("last line is incomplete (torn write or truncation)", data.count(b"\n") + 1)
    entries: list[dict[str, Any]] = []
    head = GENESIS_PREV
    for index, line in enumerate(data[:-1].split(b"\n")):
        line_no = index + 1
        if len(line) > MAX_LINE_BYTES:
            raise _fail(f"line exceeds {MAX_LINE_BYTES} bytes", line_no)
        try:
            obj = json.loads(
                line.decode("ascii"),
                object_pairs_hook=_no_duplicates,
                parse_constant=_reject_constant,
            )
        except (ValueError, RecursionError) as exc:
            raise _fail(f"not valid JSON: {exc}", line_no) from exc
        validate_entry(obj, line_no)
        if canonical_bytes(obj) != line:
            raise _fail("line is not in canonical form (edited?)", line_no)
        if obj["seq"] != index:
            raise _fail(f"seq is {obj['seq']}, expected {index} (reordered or deleted?)", line_no)
        if obj["prev"] != head:
            raise _fail("hash chain broken (line edited, reordered or deleted)", line_no)
        unsigned = {k: v for k, v in obj.items() if k != "sig"}
        if not _verify(key, canonical_bytes(unsigned), obj["sig"]):
            raise _fail("signature does not verify", line_no)
        entries.append(obj)
        head = entry_hash(line)
    return entries, head


def _read_bounded(fd: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _fail("ledger is not a regular file", 0)
    if info.st_size > MAX_FILE_BYTES:
        raise _fail(f"ledger exceeds {MAX_FILE_BYTES} bytes", 0)
    chunks: list[bytes] = []
    offset = 0
    while offset <= MAX_FILE_BYTES:
        chunk = os.pread(fd, min(1 << 20, MAX_FILE_BYTES + 1 - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_ledger(
    path: str | os.PathLike[str],
    public_key_or_cert: Any,
    *,
    expected_entries: int | None = None,
    expected_head: str | None = None,
) -> list[dict[str, Any]]:
    """Read and verify a whole ledger; raise :class:`LedgerInvalid` on any defect.

    ``expected_entries`` / ``expected_head`` (the hex hash of the last line, see
    :attr:`PrivacyLedger.head`) detect truncation at the end, which the chain
    alone cannot.
    """
    key = load_verify_key(public_key_or_cert)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(f"cannot open ledger: {exc}", 0) from exc
    try:
        data = _read_bounded(fd)
    except OSError as exc:
        raise _fail(f"cannot read ledger: {exc}", 0) from exc
    finally:
        os.close(fd)
    entries, head = _parse(data, key)
    if expected_entries is not None and len(entries) != expected_entries:
        raise _fail(f"expected {expected_entries} entries, found {len(entries)}", 0)
    if expected_head is not None and head != expected_head.lower():
        raise _fail("head hash differs from the expected one (truncated or replaced?)", 0)
    return entries
