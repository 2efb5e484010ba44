"""secure-xfl: privacy-first secure aggregation for cross-cloud federated training.

Clients clip and noise their updates (differential privacy), encrypt them with
CKKS (TenSEAL) and sign them; the aggregator sums ciphertexts only; the key
holder decrypts only aggregates that satisfy its policy.

Library use (README "Library use", ``examples/quickstart.py``): :func:`provision`
kits, :meth:`Kit.load` them, :func:`protect_update` on each client with an explicit
:class:`DPConfig` (or ``dp=None`` for none, which is logged), sum with
:class:`Accumulator`, decrypt under a :class:`KeyHolder` whose ``after_release``
appends to a :class:`PrivacyLedger` (:func:`ledger_statement` for the evidence), then
:func:`audit` the ledger.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509

from secure_xfl.config import (
    FederationSettings,
    KitConfig,
    PrivacySettings,
    RecordPrivacySettings,
    RoundSettings,
)
from secure_xfl.crypto import (
    DEFAULT_PRESET,
    PRESETS,
    Accumulator,
    CKKSPreset,
    DecryptedAggregate,
    EncryptedAggregate,
    KeyHolder,
    KeyHolderPolicy,
    ProtectedUpdate,
    TensorLayout,
    flatten,
    generate_context,
    get_preset,
    layout_of,
    load_context,
    public_context_bytes,
    seal_vector,
    unflatten,
)
from secure_xfl.crypto.dpspec import DEFAULT_DELTA, DPSpec
from secure_xfl.crypto.envelope import SignedStatement
from secure_xfl.crypto.keyholder import Release
from secure_xfl.errors import (
    ConfigError,
    CryptoError,
    PrivacyError,
    SecureXFLError,
    TrainingError,
    TransportError,
)
from secure_xfl.kit import Kit, add_client, provision, revoke
from secure_xfl.privacy.audit import AuditError, AuditReport, audit
from secure_xfl.privacy.dp import DPConfig
from secure_xfl.privacy.ledger import PrivacyLedger, read_ledger
from secure_xfl.privacy.protect import NO_DP_WARNING, protect_update, protect_vector

__version__ = "0.1.0"


def ledger_statement(signed: SignedStatement, cert: x509.Certificate) -> dict[str, Any]:
    """One participant's evidence for a :meth:`PrivacyLedger.append` ``statements`` list.

    ``signed`` is from :attr:`Release.statements`, ``cert`` that client's certificate
    (``Kit.client_certificates()[name]``); :func:`audit` with ``ca=`` checks both.
    """
    import msgpack
    from cryptography.hazmat.primitives import serialization

    return {
        "client": signed.statement.client,
        "signed": msgpack.packb(signed.to_wire(), use_bin_type=True).hex(),
        "cert": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    }


__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_PRESET",
    "NO_DP_WARNING",
    "PRESETS",
    "Accumulator",
    "AuditError",
    "AuditReport",
    "CKKSPreset",
    "ConfigError",
    "CryptoError",
    "DPConfig",
    "DPSpec",
    "DecryptedAggregate",
    "EncryptedAggregate",
    "FederationSettings",
    "KeyHolder",
    "KeyHolderPolicy",
    "Kit",
    "KitConfig",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacySettings",
    "ProtectedUpdate",
    "RecordPrivacySettings",
    "Release",
    "RoundSettings",
    "SecureXFLError",
    "SignedStatement",
    "TensorLayout",
    "TrainingError",
    "TransportError",
    "__version__",
    "add_client",
    "audit",
    "flatten",
    "generate_context",
    "get_preset",
    "layout_of",
    "ledger_statement",
    "load_context",
    "protect_update",
    "protect_vector",
    "provision",
    "public_context_bytes",
    "read_ledger",
    "revoke",
    "seal_vector",
    "unflatten",
]
