"""Typed errors of the crypto layer (all derive from :class:`CryptoError`)."""

from __future__ import annotations

from secure_xfl.errors import CryptoError

__all__ = [
    "AggregationError",
    "CodecError",
    "ContextError",
    "CryptoError",
    "DecryptionRefused",
    "DuplicateUpdate",
    "EnvelopeError",
    "InsecureParameters",
    "LayoutMismatch",
    "MaskError",
    "SignatureInvalid",
]


class InsecureParameters(CryptoError):
    """CKKS parameters below 128-bit security or otherwise unusable."""

    code = "insecure_parameters"


class ContextError(CryptoError):
    """A CKKS context could not be created, parsed or has the wrong keys."""

    code = "context"


class CodecError(CryptoError):
    """An update cannot be encoded or decoded (empty, NaN/Inf, bad dtype, bad chunk)."""

    code = "codec"


class LayoutMismatch(CodecError):
    """Two parties disagree on the tensor layout (names, shapes, dtypes)."""

    code = "layout_mismatch"


class EnvelopeError(CryptoError):
    """A protected-update envelope or aggregate is malformed or out of bounds."""

    code = "bad_envelope"


class MaskError(EnvelopeError):
    """A pairwise-mask key, cohort or mask request is refused; ``reason`` says which rule.

    Reasons (:data:`secure_xfl.crypto.masking.MASK_REASONS`): ``malformed`` (a field of
    the wrong type, size or range), ``bad_signature`` (not signed by the named client),
    ``wrong_run`` / ``wrong_round`` / ``wrong_attempt`` / ``wrong_client`` (a key for
    another context, also a cohort mixing rounds), ``bad_key`` (low-order, echoed or
    substituted X25519 key), ``bad_cohort`` (under 2 clients, a name or key twice, self
    missing), ``bad_request`` (an impossible modulus, length or values ≥ the modulus).
    """

    code = "bad_mask"

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class SignatureInvalid(CryptoError):
    """A signature does not verify for the claimed signer."""

    code = "bad_signature"


class AggregationError(CryptoError):
    """An update was refused by the accumulator (duplicate, wrong run/round, mode)."""

    code = "aggregation"


class DuplicateUpdate(AggregationError):
    """A client already contributed to this round."""

    code = "duplicate_update"


class WeightOutOfBounds(AggregationError):
    """A signed weight lies outside (0, 1] (client weighting) or (0, max_weight]."""

    code = "weight_out_of_bounds"
    reason = "weight_out_of_bounds"


class DecryptionRefused(CryptoError):
    """The key holder's policy refuses to decrypt; ``reason`` says which rule."""

    code = "decryption_refused"

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
