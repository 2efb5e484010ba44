"""CKKS contexts, update codec, envelopes, ciphertext aggregation, key holder, PKI."""

from __future__ import annotations

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import TensorLayout, TensorSpec, flatten, layout_of, unflatten
from secure_xfl.crypto.context import (
    DEFAULT_PRESET,
    PRESETS,
    CKKSPreset,
    check_security,
    generate_context,
    get_preset,
    load_context,
    public_context_bytes,
    read_context_file,
    secret_context_bytes,
    write_secret_context,
)
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import (
    EncryptedAggregate,
    ProtectedUpdate,
    SignedStatement,
    UpdateStatement,
)
from secure_xfl.crypto.errors import (
    AggregationError,
    CodecError,
    ContextError,
    DecryptionRefused,
    EnvelopeError,
    InsecureParameters,
    LayoutMismatch,
    SignatureInvalid,
)
from secure_xfl.crypto.keyholder import DecryptedAggregate, KeyHolder, KeyHolderPolicy, Release
from secure_xfl.crypto.protect import seal_vector

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Accumulator",
    "AggregationError",
    "CKKSPreset",
    "CodecError",
    "ContextError",
    "DPSpec",
    "DecryptedAggregate",
    "DecryptionRefused",
    "EncryptedAggregate",
    "EnvelopeError",
    "InsecureParameters",
    "KeyHolder",
    "KeyHolderPolicy",
    "LayoutMismatch",
    "ProtectedUpdate",
    "Release",
    "SignatureInvalid",
    "SignedStatement",
    "TensorLayout",
    "TensorSpec",
    "UpdateStatement",
    "check_security",
    "flatten",
    "generate_context",
    "get_preset",
    "layout_of",
    "load_context",
    "public_context_bytes",
    "read_context_file",
    "seal_vector",
    "secret_context_bytes",
    "unflatten",
    "write_secret_context",
]
