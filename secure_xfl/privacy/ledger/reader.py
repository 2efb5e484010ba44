"""Reading and verifying a ledger: the chain (signatures, order, canonical form) and
the evidence behind each entry (the clients' certificates and signed statements;
the signer's certificate is :mod:`~secure_xfl.privacy.ledger.trust`'s).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from secure_xfl.crypto import pki
from secure_xfl.crypto.dpspec import DPSpec, effective_noise
from secure_xfl.crypto.envelope import MAX_SIGNATURE_BYTES, SignedStatement
from secure_xfl.crypto.errors import EnvelopeError
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.errors import CryptoError
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
from secure_xfl.wire import bounded_unpack

__all__ = ["StatementCheck", "as_certificate", "entry_time", "read_ledger", "verify_statements"]

# σ and sensitivity are recomputed with the key holder's own function from the
# same signed numbers, so only float noise separates an honest record from ours.
_SIGMA_RTOL = 1e-9


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_line(line: bytes, line_no: int, key: VerifyKey, head: str) -> dict[str, Any]:
    """Verify one line (without its newline) that should follow ``head``."""
    try:
        obj = json.loads(
            line.decode("ascii"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise _fail(f"not valid JSON: {exc}", line_no) from exc
    obj = validate_entry(obj, line_no)
    if canonical_bytes(obj) != line:
        raise _fail("line is not in canonical form (edited?)", line_no)
    if obj["seq"] != line_no - 1:
        raise _fail(f"seq is {obj['seq']}, expected {line_no - 1} (reordered or deleted?)", line_no)
    if obj["prev"] != head:
        raise _fail("hash chain broken (line edited, reordered or deleted)", line_no)
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    if not _verify(key, canonical_bytes(unsigned), obj["sig"]):
        raise _fail("signature does not verify", line_no)
    return obj


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines, refusing long and torn ones before parsing."""
    pending = b""
    count = 0
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            count += 1
            if len(line) > MAX_LINE_BYTES:
                raise _fail(f"line exceeds {MAX_LINE_BYTES} bytes", count)
            yield line
        # A line without its newline is kept only up to the bound, so a file
        # with no newlines cannot make the reader buffer all of it.
        if len(pending) > MAX_LINE_BYTES:
            raise _fail(f"line exceeds {MAX_LINE_BYTES} bytes", count + 1)
    if pending:
        raise _fail("last line is incomplete (torn write or truncation)", count + 1)


def _parse(
    chunks: Iterable[bytes], key: VerifyKey, *, keep_statements: bool = True
) -> tuple[list[dict[str, Any]], str]:
    """Verify a whole ledger stream; returns its entries and head hash.

    ``keep_statements=False`` drops the bulky ``statements`` from the returned
    entries once each line is verified (the key holder keeps its whole ledger
    in memory but never needs the evidence again).
    """
    entries: list[dict[str, Any]] = []
    head = GENESIS_PREV
    for index, line in enumerate(_lines(chunks)):
        obj = _parse_line(line, index + 1, key, head)
        if not keep_statements:
            obj.pop("statements", None)
        entries.append(obj)
        head = entry_hash(line)
    return entries, head


def _read_chunks(fd: int) -> Iterator[bytes]:
    """The file's bytes in 1 MiB pieces, never more than :data:`MAX_FILE_BYTES`."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _fail("ledger is not a regular file", 0)
    if info.st_size > MAX_FILE_BYTES:
        raise _fail(f"ledger exceeds {MAX_FILE_BYTES} bytes", 0)
    offset = 0
    while True:
        try:
            chunk = os.pread(fd, 1 << 20, offset)
        except OSError as exc:
            raise _fail(f"cannot read ledger: {exc}", 0) from exc
        if not chunk:
            return
        offset += len(chunk)
        if offset > MAX_FILE_BYTES:  # the file grew after fstat
            raise _fail(f"ledger exceeds {MAX_FILE_BYTES} bytes", 0)
        yield chunk


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
        entries, head = _parse(_read_chunks(fd), key)
    finally:
        os.close(fd)
    if expected_entries is not None and len(entries) != expected_entries:
        raise _fail(f"expected {expected_entries} entries, found {len(entries)}", 0)
    if expected_head is not None and head != expected_head.lower():
        raise _fail("head hash differs from the expected one (truncated or replaced?)", 0)
    return entries


# ----------------------------------------------------------------- certificates


def as_certificate(source: Any) -> x509.Certificate | None:
    """The X.509 certificate in ``source`` (path, PEM or object); None for a bare key."""
    if isinstance(source, x509.Certificate):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        pem = source.encode("ascii", "replace")
    elif isinstance(source, bytes):
        pem = source
    elif isinstance(source, str | os.PathLike):
        with open(source, "rb") as fh:
            pem = fh.read(pki.MAX_PKI_FILE_BYTES + 1)
    else:
        return None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        return None
    return x509.load_pem_x509_certificate(pem[: pki.MAX_PKI_FILE_BYTES])


def entry_time(entry: dict[str, Any]) -> _dt.datetime:
    """The entry's ``time`` as a UTC datetime (the schema has checked its format).

    Certificates are judged at the decryption the entry records, so an audit
    years later still verifies.
    """
    return _dt.datetime.fromisoformat(entry["time"][:-1] + "+00:00")


# ------------------------------------------------------------------- statements


@dataclass
class StatementCheck:
    """What an entry's signed statements support (see :func:`verify_statements`)."""

    sigma: float | None = None
    """σ_eff recomputed from the signed DP specs; None when they could not be verified."""
    sensitivity: float | None = None
    """Sensitivity of the release (max multiplier x signed C); None without DP."""
    problems: list[str] = field(default_factory=list)
    """Authentic statements that do not support the entry (wrong round, σ, δ)."""
    forged: list[str] = field(default_factory=list)
    """Statements that are not authentic: unreadable, bad signature, foreign certificate."""
    records: dict[str, RecordDPSpec | None] = field(default_factory=dict)
    """The record-level DP-SGD spec each verified participant signed (None: none)."""


def _decode(item: dict[str, Any]) -> tuple[SignedStatement, x509.Certificate]:
    obj = bounded_unpack(
        bytes.fromhex(item["signed"]), error=EnvelopeError, what="signed statement",
        max_bin_len=max(MAX_SIGNATURE_BYTES, 64), max_str_len=4096, max_array_len=64,
        max_map_len=0,
    )  # fmt: skip
    signed = SignedStatement.from_wire(obj)
    try:
        cert = x509.load_pem_x509_certificate(item["cert"].encode("ascii"))
    except ValueError as exc:
        raise EnvelopeError(f"certificate is not PEM: {exc}") from None
    return signed, cert


def verify_statements(
    entry: dict[str, Any], ca: x509.Certificate | None, federation: str | None
) -> StatementCheck:
    """Verify an entry's signed statements and recompute its σ_eff and sensitivity.

    With ``ca`` each certificate must be a ``client`` certificate of that CA (in
    ``federation``) naming the participant, valid at the entry's time; without
    it only the signatures against the enclosed certificates are checked.
    Multipliers are ``weight / weight_scale`` under aggregator weighting, else
    1; a statement without DP means no noise (σ_eff 0).
    """
    out = StatementCheck()
    r, scale = entry["round"], entry.get("weight_scale")
    specs: list[DPSpec] = []
    multipliers: list[float] = []
    no_dp = unscaled = False
    for item in entry["statements"]:
        pid = item["client"]
        try:
            signed, cert = _decode(item)
        except (EnvelopeError, ValueError) as exc:
            out.forged.append(f"round {r}: statement of {pid} is unreadable: {exc}")
            continue
        st = signed.statement
        if ca is not None:
            try:
                who = pki.verify_peer(
                    [cert], ca, crl=None, allowed_roles={"client"}, federation=federation,
                    now=entry_time(entry),
                )  # fmt: skip
            except pki.PkiError as exc:
                out.forged.append(
                    f"round {r}: certificate of {pid} is not a client of the CA: {exc}"
                )
                continue
            if who.name != pid:
                out.forged.append(
                    f"round {r}: {pid}'s statement comes with {who.name}'s certificate"
                )
                continue
        if st.client != pid:
            out.forged.append(f"round {r}: the statement filed for {pid} names {st.client}")
            continue
        try:
            pki.verify_signature(cert, signed.signature, st.signing_bytes())
        except CryptoError as exc:  # a bad signature and an unusable key alike
            out.forged.append(f"round {r}: {pid}'s statement signature does not verify ({exc})")
            continue
        if (st.run, st.round) != (entry["run"], r):
            out.problems.append(
                f"round {r}: {pid} signed run {st.run!r} round {st.round}, not this release"
            )
        out.records[pid] = st.record
        if st.record is not None and st.record.delta != entry["delta"]:
            out.problems.append(
                f"round {r}: recorded δ {entry['delta']:g} differs from the record-level δ "
                f"{st.record.delta:g} that {pid} signed"
            )
        if st.dp is None:
            no_dp = True
        else:
            specs.append(st.dp)
            if st.dp.delta != entry["delta"]:
                out.problems.append(
                    f"round {r}: recorded δ {entry['delta']:g} differs from the δ "
                    f"{st.dp.delta:g} that {pid} signed"
                )
        # σ_eff is a ratio, so one missing common divisor does not change it; only
        # the sensitivity would be off, which the problem below reports.
        multipliers.append(st.weight / (scale or 1.0) if st.weighting == "aggregator" else 1.0)
        unscaled = unscaled or (st.weighting == "aggregator" and scale is None)
    if unscaled:
        out.problems.append(f"round {r}: aggregator-weighted statements but no weight_scale")
    if out.forged:
        return out
    if no_dp:
        out.sigma = 0.0  # a client that signed no DP added no noise and clipped nothing
    else:
        try:
            out.sigma, out.sensitivity = effective_noise(specs, multipliers)
        except EnvelopeError as exc:
            out.forged.append(f"round {r}: signed DP specs give no σ_eff: {exc}")
            return out
    if entry["noise_multiplier"] > out.sigma * (1 + _SIGMA_RTOL):
        out.problems.append(
            f"round {r}: recorded σ_eff {entry['noise_multiplier']:.6g} exceeds the "
            f"{out.sigma:.6g} the clients' signed DP specs give"
        )
    if out.sensitivity is not None and entry["clip_norm"] > out.sensitivity * (1 + _SIGMA_RTOL):
        # σ·C is the recorded noise std; a larger C than signed overstates it.
        out.problems.append(
            f"round {r}: recorded sensitivity {entry['clip_norm']:.6g} exceeds the "
            f"signed {out.sensitivity:.6g}"
        )
    return out
