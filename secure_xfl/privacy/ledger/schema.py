"""Tamper-evident privacy ledger: signed, hash-chained JSON Lines.

The key holder appends one line per decrypted aggregate — released or refused —
*before* it releases the plaintext (or refuses it), so every decryption is on
record and charged: the key holder saw a refused plaintext too, and retries of
a round over overlapping cohorts could be differenced. Each line is the canonical JSON
(:func:`canonical_bytes`: sorted keys, no whitespace, ASCII, no NaN) of an
object with these fields:

``type``             always :data:`LEDGER_TYPE`; keeps a signature over a
                     ledger line from being valid in any other protocol that
                     the same key may sign for
``seq``              0, 1, 2, … (position in the file)
``run``, ``round``   which aggregate was decrypted
``time``             ISO-8601 UTC with a trailing ``Z``
``participants``     sorted, distinct client ids in the aggregate
``enrolled``         clients enrolled in the run
``clip_norm``        ``C``: the sensitivity of the released sum to one client
``noise_multiplier`` σ_eff of the released aggregate relative to ``C``
                     (see :func:`secure_xfl.crypto.dpspec.effective_noise`)
``sample_rate``      ``len(participants) / enrolled``
``delta``            δ of the run
``rule``             aggregation rule name
``epsilon``          federation ε claimed after this decryption (RDP), counting
                     every earlier entry of the run, released or refused;
                     ``null`` means unbounded (a round decrypted without noise)
``outcome``          optional: ``"released"`` (the plaintext left the key
                     holder) or ``"refused"`` (decrypted, failed validation,
                     withheld; the round may be retried with fresh noise). A
                     (run, round) has any number of refused entries, then at
                     most one released one. Absent in older entries, which
                     read as released (:func:`outcome_of`)
``reason``           only on refused entries, required there: a short
                     identifier of why, e.g. ``aggregate_out_of_bounds``
``client_epsilon``   optional: the largest per-client ε among this entry's
                     participants after it (RDP at rate 1, their rounds only;
                     :meth:`PrivacyBudget.projected`); ``null`` means
                     unbounded. A client's ε grows only when it takes part,
                     so the running maximum over a run's entries is the
                     largest ε of any client. Absent in older entries
``dp_sgd``           optional, legacy: record-level DP-SGD parameters (unsigned)
``record_epsilon``   optional: each participant's record-level ε after this
                     entry (PLD, at ``delta``) from the DP-SGD specs its signed
                     statements carry, over every entry it took part in;
                     ``{participant: ε}`` for the participants that signed one,
                     ``null`` meaning unbounded
``statements``       optional: the evidence behind ``noise_multiplier`` and
                     ``clip_norm`` — one object per participant, in
                     ``participants`` order, with exactly the keys ``client``
                     (the participant), ``signed`` (lowercase hex of the
                     msgpack of the client's ``SignedStatement.to_wire()``,
                     at most :data:`MAX_STATEMENT_BYTES` bytes) and ``cert``
                     (the client's PEM certificate, at most
                     :data:`MAX_CERT_PEM_CHARS` characters). The audit checks
                     them against the federation CA and recomputes σ_eff from
                     them; entries without them (older key holders) are
                     readable but their σ rests on the key holder's word
``weight_scale``     optional: the aggregator-side divisor of the signed
                     weights (client i was multiplied by ``weight_i /
                     weight_scale`` under ``aggregator`` weighting, by 1 under
                     ``client`` weighting); a finite float > 0
``prev``             hex SHA-256 of the previous line's bytes (without its
                     newline); for ``seq`` 0 it is :data:`GENESIS_PREV`
``sig``              hex signature by the key holder over the canonical JSON of
                     the object without ``sig``: Ed25519, or ECDSA P-256 with
                     SHA-256 (DER)

The chain detects edited, reordered, inserted and deleted lines, except one:
**dropping lines from the end leaves a valid shorter ledger**. Detecting that
needs an anchor kept elsewhere — the ``expected_entries`` / ``expected_head``
arguments of :func:`read_ledger` take the entry count or :attr:`PrivacyLedger.head`
published out of band (e.g. in the run's signed round announcements).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from secure_xfl.errors import PrivacyError

__all__ = [
    "GENESIS_PREV",
    "LEDGER_TYPE",
    "MAX_CERT_PEM_CHARS",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "MAX_STATEMENT_BYTES",
    "LedgerError",
    "LedgerInvalid",
    "canonical_bytes",
    "entry_hash",
    "load_verify_key",
    "outcome_of",
    "validate_entry",
]

LEDGER_TYPE = "secure-xfl/privacy-ledger/v1"
#: ``prev`` of the first line: SHA-256 of a fixed, documented string.
GENESIS_PREV = hashlib.sha256(b"secure-xfl/privacy-ledger/v1/genesis").hexdigest()
#: Bounds checked before anything is parsed, so a hostile file cannot make
#: the auditor allocate without limit. With ``statements`` a line carries about
#: 2 KB per participant (a ~0.9 KB PEM certificate and a ~0.35 KB signed
#: statement, which hex doubles), ~0.4 MB for 200 participants: that fits the
#: old 1 MiB line, but the old 64 MiB file then held only ~160 rounds. 1 GiB
#: holds ~2,500 such rounds; 16 MiB lines leave ~40x headroom per line (~8,000
#: participants at real sizes). Readers stream the file, so memory is one line
#: plus the verified entries, never the raw file.
MAX_FILE_BYTES = 1024 * 1024 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024
#: Per-participant caps inside ``statements`` (see the field table above).
MAX_CERT_PEM_CHARS = 8 * 1024
MAX_STATEMENT_BYTES = 64 * 1024

_MAX_ID_CHARS = 256
_MAX_PARTICIPANTS = 100_000
_MAX_INT = 2**53  # larger values do not survive some JSON consumers
_MAX_DP_SGD_KEYS = 32
_MAX_SIG_HEX = 2 * 160
_HEX = frozenset("0123456789abcdef")
_RULE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:+-")
_REQUIRED = frozenset(
    {
        "type", "seq", "run", "round", "time", "participants", "enrolled", "clip_norm",
        "noise_multiplier", "sample_rate", "delta", "rule", "epsilon", "prev", "sig",
    }
)  # fmt: skip
_OPTIONAL = frozenset(
    {
        "dp_sgd",
        "statements",
        "weight_scale",
        "outcome",
        "reason",
        "client_epsilon",
        "record_epsilon",
    }
)
OUTCOMES = ("released", "refused")
_STATEMENT_KEYS = frozenset({"client", "signed", "cert"})
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


class LedgerError(PrivacyError):
    """The ledger cannot be opened or appended to."""

    code = "privacy.ledger"


class LedgerInvalid(LedgerError):
    """The ledger fails verification: unreadable, malformed, edited or forged.

    ``line_no`` is 1-based; 0 means the file as a whole.
    """

    code = "privacy.ledger.invalid"

    def __init__(self, reason: str, line_no: int = 0) -> None:
        self.reason = reason
        self.line_no = line_no
        super().__init__(f"line {line_no}: {reason}" if line_no else reason)


def canonical_bytes(obj: Any) -> bytes:
    """The one byte string a ledger object may be written, hashed and signed as."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(line: bytes) -> str:
    """Hex SHA-256 of a ledger line (without its newline): the next ``prev``."""
    return hashlib.sha256(line).hexdigest()


# --------------------------------------------------------------------------- keys


def _check_curve(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> None:
    if not isinstance(key.curve, ec.SECP256R1):
        raise LedgerError(f"ECDSA ledger keys must be P-256, got {key.curve.name}")


def load_verify_key(source: Any) -> VerifyKey:
    """Public key from a key object, a certificate, PEM bytes/text or a PEM file path.

    Accepts an X.509 certificate (its subject key is used) or a public key;
    only Ed25519 and ECDSA P-256 keys are allowed.
    """
    key: Any = source
    if isinstance(source, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        key = source.public_key()
    elif isinstance(source, x509.Certificate):
        key = source.public_key()
    elif isinstance(source, str | bytes | os.PathLike):
        if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
            pem = source.encode("ascii", "replace")
        elif isinstance(source, bytes):
            pem = source
        else:
            try:
                with open(source, "rb") as fh:
                    pem = fh.read(1024 * 1024 + 1)
            except OSError as exc:
                raise LedgerError(f"cannot read key holder certificate/key: {exc}") from exc
        if len(pem) > 1024 * 1024:
            raise LedgerError("certificate/key file is too large")
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                key = x509.load_pem_x509_certificate(pem).public_key()
            else:
                key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise LedgerError(f"not a PEM certificate or public key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        _check_curve(key)
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise LedgerError(f"unsupported ledger verification key: {type(key).__name__}")


def _sign(key: SigningKey, data: bytes) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data).hex()
    return key.sign(data, ec.ECDSA(hashes.SHA256())).hex()


def _verify(key: VerifyKey, data: bytes, sig_hex: str) -> bool:
    sig = bytes.fromhex(sig_hex)
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, data)
        else:
            key.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------- validation


def _fail(reason: str, line_no: int) -> LedgerInvalid:
    return LedgerInvalid(reason, line_no)


def _int(obj: dict[str, Any], name: str, line_no: int, minimum: int = 0) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{name} must be an integer", line_no)
    if not minimum <= value <= _MAX_INT:
        raise _fail(f"{name} out of range: {value}", line_no)
    return value


def _float(obj: dict[str, Any], name: str, line_no: int) -> float:
    value = obj[name]
    # Writers always emit floats (1.0, not 1), so an int here means a foreign edit.
    if not isinstance(value, float) or not math.isfinite(value):
        raise _fail(f"{name} must be a finite float", line_no)
    return value


def _ident(value: Any, name: str, line_no: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_CHARS:
        raise _fail(f"{name} must be a string of 1..{_MAX_ID_CHARS} characters", line_no)
    if not value.isprintable():
        raise _fail(f"{name} contains control characters", line_no)
    return value


def _hex(value: Any, name: str, line_no: int, max_len: int) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= max_len
        or len(value) % 2
        or not set(value) <= _HEX
    ):
        raise _fail(f"{name} must be lowercase hex", line_no)
    return value


def _check_time(value: Any, line_no: int) -> None:
    if not isinstance(value, str) or len(value) > 40 or not value.endswith("Z"):
        raise _fail("time must be ISO-8601 UTC ending in 'Z'", line_no)
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError as exc:
        raise _fail(f"time is not ISO-8601: {exc}", line_no) from exc
    if parsed.utcoffset() != UTC.utcoffset(None):
        raise _fail("time must be UTC", line_no)


def _check_dp_sgd(value: Any, line_no: int) -> None:
    if not isinstance(value, dict) or len(value) > _MAX_DP_SGD_KEYS:
        raise _fail(f"dp_sgd must be an object of at most {_MAX_DP_SGD_KEYS} keys", line_no)
    for key, item in value.items():
        _ident(key, "dp_sgd key", line_no)
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, float) and math.isfinite(item):
            continue
        if isinstance(item, str) and len(item) <= _MAX_ID_CHARS:
            continue
        raise _fail(f"dp_sgd[{key!r}] must be a scalar", line_no)


def _check_record_epsilon(value: Any, participants: list[str], line_no: int) -> None:
    if not isinstance(value, dict) or not set(value) <= set(participants):
        raise _fail("record_epsilon must map participants to ε", line_no)
    for eps in value.values():
        ok = eps is None or (isinstance(eps, float) and math.isfinite(eps) and eps >= 0)
        if not ok:
            raise _fail("record_epsilon values must be finite floats ≥ 0 or null", line_no)


def outcome_of(entry: Mapping[str, Any]) -> str:
    """``"released"`` or ``"refused"``; entries from before the field read as released."""
    return str(entry.get("outcome", "released"))


def _check_outcome(obj: dict[str, Any], line_no: int) -> None:
    outcome = obj.get("outcome", "released")
    if outcome not in OUTCOMES:
        raise _fail(f"outcome must be one of {list(OUTCOMES)}", line_no)
    if outcome == "released":
        if "reason" in obj:
            raise _fail("reason is only recorded on refused entries", line_no)
        return
    reason = obj.get("reason")
    if not isinstance(reason, str) or not 0 < len(reason) <= 64 or not set(reason) <= _RULE_CHARS:
        raise _fail("a refused entry needs a reason: a short identifier", line_no)


def _check_pem(value: Any, line_no: int, index: int) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CERT_PEM_CHARS:
        raise _fail(
            f"statements[{index}].cert must be a PEM string of at most "
            f"{MAX_CERT_PEM_CHARS} characters",
            line_no,
        )
    # PEM is ASCII lines; anything else (control characters, other encodings)
    # has no business in a certificate and would only hide content.
    if not value.isascii() or not all(ch.isprintable() or ch == "\n" for ch in value):
        raise _fail(f"statements[{index}].cert contains non-PEM characters", line_no)
    if not value.startswith(_PEM_BEGIN) or _PEM_END not in value:
        raise _fail(f"statements[{index}].cert is not a PEM certificate", line_no)


def _check_statements(value: Any, participants: list[str], line_no: int) -> None:
    # Exactly one per participant, in the same order: an audit can then pair
    # each released participant with its own signed claim without searching,
    # and a statement of a client that was not released cannot ride along.
    if not isinstance(value, list) or len(value) != len(participants):
        raise _fail("statements must be a list with one entry per participant", line_no)
    for index, (item, pid) in enumerate(zip(value, participants, strict=True)):
        if not isinstance(item, dict) or set(item) != _STATEMENT_KEYS:
            raise _fail(
                f"statements[{index}] must be an object with keys {sorted(_STATEMENT_KEYS)}",
                line_no,
            )
        if item["client"] != pid:
            raise _fail(f"statements[{index}].client must be participant {pid!r}", line_no)
        _hex(item["signed"], f"statements[{index}].signed", line_no, 2 * MAX_STATEMENT_BYTES)
        _check_pem(item["cert"], line_no, index)


def validate_entry(obj: Any, line_no: int = 0) -> dict[str, Any]:
    """Type- and range-check one parsed ledger object (signature and chain aside)."""
    if not isinstance(obj, dict):
        raise _fail("entry must be a JSON object", line_no)
    keys = set(obj)
    if missing := _REQUIRED - keys:
        raise _fail(f"missing fields: {sorted(missing)}", line_no)
    if unknown := keys - _REQUIRED - _OPTIONAL:
        raise _fail(f"unknown fields: {sorted(unknown)}", line_no)
    if obj["type"] != LEDGER_TYPE:
        raise _fail(f"type must be {LEDGER_TYPE!r}", line_no)
    _int(obj, "seq", line_no)
    _ident(obj["run"], "run", line_no)
    _int(obj, "round", line_no)
    _check_time(obj["time"], line_no)
    participants = obj["participants"]
    if not isinstance(participants, list) or not 0 < len(participants) <= _MAX_PARTICIPANTS:
        raise _fail("participants must be a non-empty list", line_no)
    for pid in participants:
        _ident(pid, "participant id", line_no)
    if any(a >= b for a, b in itertools.pairwise(participants)):
        raise _fail("participants must be sorted and distinct", line_no)
    if _int(obj, "enrolled", line_no, minimum=1) < len(participants):
        raise _fail("more participants than enrolled clients", line_no)
    if _float(obj, "clip_norm", line_no) <= 0:
        raise _fail("clip_norm must be > 0", line_no)
    if _float(obj, "noise_multiplier", line_no) < 0:
        raise _fail("noise_multiplier must be ≥ 0", line_no)
    if not 0 < _float(obj, "sample_rate", line_no) <= 1:
        raise _fail("sample_rate must lie in (0, 1]", line_no)
    if not 0 < _float(obj, "delta", line_no) < 1:
        raise _fail("delta must lie in (0, 1)", line_no)
    rule = obj["rule"]
    if not isinstance(rule, str) or not 0 < len(rule) <= 64 or not set(rule) <= _RULE_CHARS:
        raise _fail("rule must be a short identifier", line_no)
    for name in ("epsilon", "client_epsilon"):
        if obj.get(name) is not None and _float(obj, name, line_no) < 0:
            raise _fail(f"{name} must be ≥ 0 or null", line_no)
    _check_outcome(obj, line_no)
    if "dp_sgd" in obj:
        _check_dp_sgd(obj["dp_sgd"], line_no)
    if "record_epsilon" in obj:
        _check_record_epsilon(obj["record_epsilon"], participants, line_no)
    if "statements" in obj:
        _check_statements(obj["statements"], participants, line_no)
    if "weight_scale" in obj and not _float(obj, "weight_scale", line_no) > 0:
        raise _fail("weight_scale must be > 0", line_no)
    _hex(obj["prev"], "prev", line_no, 64)
    if len(obj["prev"]) != 64:
        raise _fail("prev must be a SHA-256 hex digest", line_no)
    _hex(obj["sig"], "sig", line_no, _MAX_SIG_HEX)
    return obj
