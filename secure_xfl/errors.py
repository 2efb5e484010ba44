"""Exception roots, one per layer.

Every error secure-xfl raises on purpose derives from :class:`SecureXFLError`,
so a pipeline can catch the whole library with one ``except``; each layer has
its own root so callers can tell a refused decryption from a dropped peer.
"""

from __future__ import annotations


class SecureXFLError(Exception):
    """Root of every error raised deliberately by secure-xfl."""

    #: Short machine-readable code, sent to peers in error replies.
    code: str = "error"


class CryptoError(SecureXFLError):
    """Root of the crypto layer: contexts, codec, envelopes, aggregation, key holder."""

    code = "crypto"


class PrivacyError(SecureXFLError):
    """Root of the privacy layer: clipping, noise, accounting, ledger, audit."""

    code = "privacy"


class TransportError(SecureXFLError):
    """Root of the transport layer: QUIC, mutual TLS, framing, limits."""

    code = "transport"


class TrainingError(SecureXFLError):
    """Root of the training layer: models, data, aggregation rules, runtimes."""

    code = "training"


class ConfigError(SecureXFLError):
    """Invalid configuration or startup kit."""

    code = "config"
