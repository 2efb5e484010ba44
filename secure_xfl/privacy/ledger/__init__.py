"""Tamper-evident privacy ledger: schema (what a line is), reader (verify the chain and
the signed evidence), writer (append)."""

from secure_xfl.privacy.ledger.reader import (
    StatementCheck,
    as_certificate,
    read_ledger,
    verify_signer,
    verify_statements,
)
from secure_xfl.privacy.ledger.schema import (
    GENESIS_PREV,
    LEDGER_TYPE,
    MAX_CERT_PEM_CHARS,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    MAX_STATEMENT_BYTES,
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
    "MAX_CERT_PEM_CHARS",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "MAX_STATEMENT_BYTES",
    "LedgerError",
    "LedgerInvalid",
    "PrivacyLedger",
    "StatementCheck",
    "as_certificate",
    "canonical_bytes",
    "entry_hash",
    "load_verify_key",
    "read_ledger",
    "validate_entry",
    "verify_signer",
    "verify_statements",
]
