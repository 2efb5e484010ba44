"""A masked round's cohort: what clients sign about it and how they check it.

The aggregator fixes a cohort per (run, round, epoch) and relays every member's
:class:`~secure_xfl.crypto.masking.SignedMaskKey` together with that member's
certificate. A client trusts none of it: :func:`verify_cohort` chains each
certificate to its own federation CA (role ``client``, its CRL), checks the name in the
certificate is the name in the key, checks the key's signature with that certificate,
finds its own key unchanged, and refuses a cohort smaller than its own kit allows.

Each masked upload's statement then signs a :class:`MaskClaim` (epoch, the sorted
member names, the cohort digest). The key holder decrypts a masked aggregate only if
every entry signed the same claim and the manifest names exactly its members, so the
masks cancel; anything else (one client's ciphertext, a partial sum) decrypts to
values uniform mod M and is refused by the packed range checks.

``epoch`` is the masking attempt within a round: it grows each time the aggregator
re-fixes a cohort (a member dropped after the cohort was fixed), and it is the
``attempt`` of :mod:`.masking`'s keys and seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography import x509

from secure_xfl.crypto import pki
from secure_xfl.crypto.errors import DecryptionRefused, EnvelopeError, MaskError
from secure_xfl.crypto.masking import (
    MAX_COHORT,
    MaskKeyPair,
    SignedMaskKey,
    Uint64Array,
    client_mask,
    cohort_digest,
)

__all__ = [
    "CohortMask", "MaskClaim", "centre", "check_manifest_masks", "cohort_to_wire",
    "verify_cohort",
]  # fmt: skip

#: A relayed certificate is refused above this size before parsing.
MAX_CERT_BYTES = 16 * 1024
MAX_EPOCH = 1_000_000


@dataclass(frozen=True)
class MaskClaim:
    """What a masked update's statement signs about the cohort it was masked for."""

    epoch: int
    """Masking attempt within the round (grows when a cohort is re-fixed)."""
    clients: tuple[str, ...]
    """Sorted names of every cohort member: the masks cancel only over all of them."""
    digest: bytes
    """:func:`~secure_xfl.crypto.masking.cohort_digest` of the members' signed keys."""

    def to_wire(self) -> list[Any]:
        """Positional form inside the signed statement."""
        return [self.epoch, list(self.clients), self.digest]

    @classmethod
    def from_wire(cls, obj: object) -> MaskClaim:
        """Strict parse (typed :class:`EnvelopeError`)."""
        if not isinstance(obj, list) or len(obj) != 3:
            raise EnvelopeError("mask claim must be [epoch, clients, digest]")
        epoch, names, digest = obj
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
            raise EnvelopeError(f"mask epoch must be an integer in [0, {MAX_EPOCH}]")
        if not isinstance(names, list) or not 2 <= len(names) <= MAX_COHORT:
            raise EnvelopeError(f"a masked cohort names 2..{MAX_COHORT} clients")
        if not all(isinstance(n, str) and 0 < len(n) <= 128 for n in names):
            raise EnvelopeError("mask cohort names must be short strings")
        if names != sorted(set(names)):
            raise EnvelopeError("mask cohort names must be sorted and distinct")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise EnvelopeError("mask cohort digest must be 32 bytes")
        return cls(epoch, tuple(names), digest)


def cohort_to_wire(entries: Sequence[tuple[SignedMaskKey, bytes]]) -> list[list[Any]]:
    """The aggregator's relay form: ``[[key, certificate PEM], …]`` sorted by name."""
    return [[k.to_wire(), cert] for k, cert in sorted(entries, key=lambda e: e[0].client)]


def _certificate(raw: object, who: str) -> x509.Certificate:
    if not isinstance(raw, bytes) or not 0 < len(raw) <= MAX_CERT_BYTES:
        raise MaskError("malformed", f"{who}: certificate must be 1..{MAX_CERT_BYTES} bytes")
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise MaskError("malformed", f"{who}: not a PEM certificate") from exc


def verify_cohort(
    wire: object,
    *,
    ca: x509.Certificate,
    crl: x509.CertificateRevocationList | None,
    federation: str,
    run: str,
    round: int,
    epoch: int,
    own_name: str,
    own: MaskKeyPair,
    min_size: int,
) -> tuple[SignedMaskKey, ...]:
    """Check a relayed cohort against this client's own trust anchors and policy.

    Returns the members' keys; any defect is a :class:`MaskError` (``bad_cohort`` when
    the cohort itself is unacceptable, the key's own reasons otherwise).
    """
    if not isinstance(wire, list) or not 1 <= len(wire) <= MAX_COHORT:
        raise MaskError("malformed", f"cohort must be a list of 1..{MAX_COHORT} entries")
    keys: list[SignedMaskKey] = []
    for entry in wire:
        if not isinstance(entry, list) or len(entry) != 2:
            raise MaskError("malformed", "cohort entry must be [key, certificate]")
        key = SignedMaskKey.from_wire(entry[0])
        cert = _certificate(entry[1], key.client)
        try:
            ident = pki.verify_peer(
                [cert], ca, crl=crl, allowed_roles=("client",), federation=federation
            )
        except pki.PeerRejected as exc:
            raise MaskError("bad_signature", f"{key.client}: certificate refused: {exc}") from None
        if ident.name != key.client:
            raise MaskError("wrong_client", f"key names {key.client!r}, certificate {ident.name!r}")
        key.verify(cert, run=run, round=round, attempt=epoch, client=ident.name)
        keys.append(key)
    names = [k.client for k in keys]
    if len(set(names)) != len(names):
        raise MaskError("bad_cohort", "a client appears twice in the cohort")
    mine = [k for k in keys if k.client == own_name]
    if not mine:
        raise MaskError("bad_cohort", f"{own_name!r} is not in the cohort it is asked to mask for")
    if mine[0].public_key != own.public_bytes:
        raise MaskError("bad_key", "the cohort names another key for this client")
    if len(keys) < max(2, min_size):
        raise MaskError(
            "bad_cohort", f"cohort of {len(keys)} < {max(2, min_size)} (this client's own kit)"
        )
    cohort_digest(keys)  # distinct keys too
    return tuple(sorted(keys, key=lambda k: k.client))


@dataclass(frozen=True)
class CohortMask:
    """One client's side of a verified cohort: builds its mask and its claim."""

    run: str
    """Run id."""
    round: int
    """Round number."""
    epoch: int
    """Masking attempt within the round."""
    own_name: str
    """This client's name."""
    own: MaskKeyPair
    """This client's key pair for (run, round, epoch)."""
    keys: tuple[SignedMaskKey, ...]
    """Every member's verified key, this client's included (:func:`verify_cohort`)."""

    @property
    def claim(self) -> MaskClaim:
        """The claim the update's statement signs."""
        names = tuple(sorted(k.client for k in self.keys))
        return MaskClaim(self.epoch, names, cohort_digest(self.keys))

    def mask(self, n: int, modulus: int) -> Uint64Array:
        """This client's Σ ±mask_ij mod ``modulus`` over ``n`` slots."""
        return client_mask(
            self.own,
            self.keys,
            n=n,
            modulus=modulus,
            run=self.run,
            round=self.round,
            attempt=self.epoch,
            own_name=self.own_name,
        )


def centre(residues: Uint64Array, modulus: int) -> np.ndarray:
    """Residues in [0, M) as float64 in [−M/2, M/2): a sum of centred residues has no
    constant term, which keeps the CKKS coefficients of a masked sum small."""
    out = residues.astype(np.int64)
    out[out >= modulus // 2] -= modulus
    return out.astype(np.float64)


def check_manifest_masks(
    statements: Sequence[Any], preset: Any, required: bool
) -> MaskClaim | None:
    """The key holder's rule: a masked aggregate is released only over its whole cohort.

    ``statements``: the manifest's :class:`~secure_xfl.crypto.envelope.UpdateStatement`\\ s.
    Every entry must sign one claim and the manifest must name exactly its members
    (else the masks do not cancel and, worse, a partial sum or a single upload would be
    decrypted); ``required`` (the key holder's own kit) refuses unmasked entries of a
    packed ``preset``.
    Returns the claim (``None``: unmasked).
    """
    packed = bool(preset.packed)
    claims = {st.mask for st in statements}
    if len(claims) != 1:
        raise DecryptionRefused("mask_mismatch", "entries signed different mask cohorts")
    claim: MaskClaim | None = next(iter(claims))
    if claim is None:
        if required and packed:
            raise DecryptionRefused(
                "not_masked", "this key holder's kit requires pairwise masks on packed updates"
            )
        return None
    if not packed:
        raise DecryptionRefused("mask_mismatch", "masked entries under an unpacked preset")
    names = tuple(sorted(st.client for st in statements))
    if names != claim.clients:
        missing = sorted(set(claim.clients) - set(names))
        raise DecryptionRefused(
            "incomplete_cohort",
            f"the manifest is not the masked cohort (missing {missing or 'none'}; "
            f"{len(names)} entries, cohort of {len(claim.clients)})",
        )
    return claim
