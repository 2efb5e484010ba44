"""Privacy layer: client-level DP, accounting, the budget, the signed ledger and its audit."""

from __future__ import annotations

from secure_xfl.privacy.accountant import (
    ALPHAS,
    AccountingError,
    PRVUnavailable,
    calibrate_noise,
    epsilon,
    epsilon_for,
    rdp_curve,
    rdp_to_epsilon,
)
from secure_xfl.privacy.audit import AuditError, AuditReport, audit
from secure_xfl.privacy.budget import PrivacyBudget
from secure_xfl.privacy.dp import (
    DPConfig,
    InvalidDPConfig,
    InvalidUpdate,
    add_client_noise,
    clip_l2,
    effective_noise_multiplier,
    privatize,
    secure_rng,
)
from secure_xfl.privacy.ledger import (
    GENESIS_PREV,
    LEDGER_TYPE,
    LedgerError,
    LedgerInvalid,
    PrivacyLedger,
    canonical_bytes,
    load_verify_key,
    read_ledger,
)

__all__ = [
    "ALPHAS",
    "GENESIS_PREV",
    "LEDGER_TYPE",
    "AccountingError",
    "AuditError",
    "AuditReport",
    "DPConfig",
    "InvalidDPConfig",
    "InvalidUpdate",
    "LedgerError",
    "LedgerInvalid",
    "PRVUnavailable",
    "PrivacyBudget",
    "PrivacyLedger",
    "add_client_noise",
    "audit",
    "calibrate_noise",
    "canonical_bytes",
    "clip_l2",
    "effective_noise_multiplier",
    "epsilon",
    "epsilon_for",
    "load_verify_key",
    "privatize",
    "rdp_curve",
    "rdp_to_epsilon",
    "read_ledger",
    "secure_rng",
]
