"""secure-xfl: privacy-first secure aggregation for cross-cloud federated training.

Clients clip and noise their updates (differential privacy), encrypt them with
CKKS (TenSEAL) and sign them; the aggregator sums ciphertexts only; the key
holder decrypts only aggregates that satisfy its policy.
"""

from __future__ import annotations

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
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.errors import (
    ConfigError,
    CryptoError,
    PrivacyError,
    SecureXFLError,
    TrainingError,
    TransportError,
)
from secure_xfl.privacy.protect import protect_update, protect_vector

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Accumulator",
    "CKKSPreset",
    "ConfigError",
    "CryptoError",
    "DPSpec",
    "DecryptedAggregate",
    "EncryptedAggregate",
    "KeyHolder",
    "KeyHolderPolicy",
    "PrivacyError",
    "ProtectedUpdate",
    "SecureXFLError",
    "TensorLayout",
    "TrainingError",
    "TransportError",
    "__version__",
    "flatten",
    "generate_context",
    "get_preset",
    "layout_of",
    "load_context",
    "protect_update",
    "protect_vector",
    "public_context_bytes",
    "seal_vector",
    "unflatten",
]
