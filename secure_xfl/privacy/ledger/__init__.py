"""Tamper-evident privacy ledger: schema (what a line is), reader (verify), writer (append)."""

from secure_xfl.privacy.ledger.reader import read_ledger
from secure_xfl.privacy.ledger.schema import (
    GENESIS_PREV,
    LEDGER_TYPE,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    LedgerError,
    LedgerInvalid,
    canonical_bytes,
    entry_hash,
    load_verify_key,
    validate_entry,
)
from secure_xfl.privacy.ledger.writer import PrivacyLedger

__all__ = [
    "GENESIS_PREV",
    "LEDGER_TYPE",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "LedgerError",
    "LedgerInvalid",
    "PrivacyLedger",
    "canonical_bytes",
    "entry_hash",
    "load_verify_key",
    "read_ledger",
    "validate_entry",
]
