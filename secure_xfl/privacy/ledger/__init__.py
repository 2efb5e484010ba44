"""Tamper-evident privacy ledger: schema (what a line is), reader (verify the chain and
the signed evidence), trust (who may sign it), writer (append)."""

from secure_xfl.privacy.ledger.reader import (
    StatementCheck,
    as_certificate,
    entry_time,
    read_ledger,
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
    outcome_of,
    validate_entry,
)
from secure_xfl.privacy.ledger.trust import (
    KitTrust,
    ca_federation,
    kit_trust,
    load_ca,
    load_crl,
    verify_signer,
)
from secure_xfl.privacy.ledger.writer import PrivacyLedger

__all__ = [
    "GENESIS_PREV",
    "LEDGER_TYPE",
    "MAX_CERT_PEM_CHARS",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "MAX_STATEMENT_BYTES",
    "KitTrust",
    "LedgerError",
    "LedgerInvalid",
    "PrivacyLedger",
    "StatementCheck",
    "as_certificate",
    "ca_federation",
    "canonical_bytes",
    "entry_hash",
    "entry_time",
    "kit_trust",
    "load_ca",
    "load_crl",
    "load_verify_key",
    "outcome_of",
    "read_ledger",
    "validate_entry",
    "verify_signer",
    "verify_statements",
]
