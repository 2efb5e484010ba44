"""Federation PKI: the run's CA, role certificates, CRLs, peer verification, signatures.

Every party of a run holds an ECDSA P-256 key and a certificate issued by the
run's own CA (the provisioner keeps the CA key offline). A certificate names its
holder with exactly one SPIFFE-style URI SAN,
``spiffe://<federation>/<role>/<name>``; that URI — never the subject CN or a
hostname — is the identity the rest of secure-xfl trusts.

All X.509 and signature work goes through ``cryptography``; nothing here is a
home-made primitive.

Errors: every failure is a :class:`PkiError` (a :class:`~secure_xfl.errors.CryptoError`).
A refused peer raises :class:`PeerRejected`, whose ``reason`` is one of
:data:`REJECT_REASONS`; the transport maps it to a TLS alert.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secure_xfl.crypto.errors import SignatureInvalid
from secure_xfl.errors import CryptoError

__all__ = [
    "MAX_PKI_FILE_BYTES",
    "REJECT_REASONS",
    "ROLES",
    "PeerIdentity",
    "PeerRejected",
    "PkiError",
    "PkiFileError",
    "SignatureInvalid",
    "build_crl",
    "create_ca",
    "identity_of",
    "issue_certificate",
    "sign",
    "verify_peer",
    "verify_signature",
]

ROLES: tuple[str, ...] = ("client", "aggregator", "keyholder")

#: Upper bound on any PEM file we read: certificates, keys and CRLs are a few KiB,
#: so anything larger is garbage or an attack on memory.
MAX_PKI_FILE_BYTES = 1 << 20

REJECT_REASONS: tuple[str, ...] = (
    "no_certificate",
    "untrusted",
    "expired",
    "not_yet_valid",
    "is_ca",
    "revoked",
    "bad_crl",
    "bad_identity",
    "wrong_role",
    "wrong_federation",
)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# The federation is the URI authority, so it must be a valid DNS-style label run.
_FEDERATION_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
_SPIFFE_RE = re.compile(r"spiffe://([^/]+)/([^/]+)/([^/]+)")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class PkiError(CryptoError):
    """Root of PKI failures (bad identity, bad file, bad signature, refused peer)."""

    code = "pki"


class PkiFileError(PkiError):
    """A PEM file is missing, too large, or does not hold what it should."""

    code = "pki_file"


class PeerRejected(PkiError):
    """A peer certificate chain is refused; ``reason`` says why (see REJECT_REASONS)."""

    code = "peer_rejected"

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECT_REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class PeerIdentity:
    """Who a certificate belongs to, as named by its SPIFFE URI SAN."""

    federation: str
    """The run's federation (URI authority); one CA per federation."""
    role: str
    """One of :data:`ROLES`."""
    name: str
    """Party name, ``[a-z0-9][a-z0-9._-]{0,62}``."""

    def __post_init__(self) -> None:
        if not _FEDERATION_RE.fullmatch(self.federation):
            raise PkiError(f"invalid federation name {self.federation!r}")
        if self.role not in ROLES:
            raise PkiError(f"invalid role {self.role!r}; expected one of {ROLES}")
        if not _NAME_RE.fullmatch(self.name):
            raise PkiError(f"invalid party name {self.name!r}")

    @property
    def spiffe_id(self) -> str:
        """``spiffe://<federation>/<role>/<name>``."""
        return f"spiffe://{self.federation}/{self.role}/{self.name}"

    @classmethod
    def parse(cls, uri: str) -> PeerIdentity:
        """Parse a SPIFFE URI strictly (no port, query, fragment, extra segments)."""
        match = _SPIFFE_RE.fullmatch(uri)
        if match is None:
            raise PkiError(f"not a secure-xfl SPIFFE id: {uri[:200]!r}")
        return cls(federation=match[1], role=match[2], name=match[3])

    def __str__(self) -> str:
        return self.spiffe_id


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    federation: str, *, valid_days: int = 3650
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create the federation's self-signed CA (P-256, may only sign leaves and CRLs)."""
    if not _FEDERATION_RE.fullmatch(federation):
        raise PkiError(f"invalid federation name {federation!r}")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"secure-xfl CA {federation}")])
    now = _utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        # path_length=0: the CA signs leaves only; no intermediates exist in a run.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    identity: PeerIdentity,
    *,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    valid_days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue a leaf certificate for ``identity`` with a fresh P-256 key.

    The leaf is usable as both TLS server and client (every party dials and is
    dialled). Besides the SPIFFE URI it names ``localhost``/``127.0.0.1`` so that
    stock hostname checks pass on loopback; identity decisions never use them.
    """
    key = _new_key()
    start = not_before if not_before is not None else _utcnow() - _dt.timedelta(minutes=5)
    end = not_after if not_after is not None else start + _dt.timedelta(days=valid_days)
    if end <= start:
        raise PkiError("certificate validity window is empty")
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{identity.role}/{identity.name}")])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(identity.spiffe_id),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    x509.IPAddress(ipaddress.IPv6Address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The certificate's identity: its one and only ``spiffe://`` URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound as exc:
        raise PkiError("certificate has no subjectAltName") from exc
    except ValueError as exc:  # malformed extension bytes are parsed lazily
        raise PkiError(f"certificate extensions are malformed: {exc}") from exc
    spiffe = [u for u in uris if u.lower().startswith("spiffe://")]
    if len(spiffe) != 1:
        raise PkiError(f"certificate must carry exactly one spiffe URI SAN, has {len(spiffe)}")
    return PeerIdentity.parse(spiffe[0])


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked_serials: Iterable[int],
    *,
    next_update_days: int = 30,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA listing ``revoked_serials``."""
    now = _utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _dt.timedelta(minutes=5))
        .next_update(now + _dt.timedelta(days=next_update_days))
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - _dt.timedelta(minutes=5))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _check_crl(
    crl: x509.CertificateRevocationList, ca_cert: x509.Certificate, now: _dt.datetime
) -> None:
    ca_public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise PeerRejected("bad_crl", "CRL was not issued by the federation CA")
    if not crl.is_signature_valid(ca_public):
        raise PeerRejected("bad_crl", "CRL signature does not verify under the CA key")
    # A stale CRL means revocations may be missing: fail closed rather than trust it.
    next_update = crl.next_update_utc
    if next_update is not None and now > next_update:
        raise PeerRejected("bad_crl", "CRL is past its nextUpdate; publish a fresh one")


def verify_peer(
    chain: Sequence[x509.Certificate],
    ca_cert: x509.Certificate,
    *,
    crl: x509.CertificateRevocationList | None,
    allowed_roles: Collection[str],
    federation: str | None = None,
    now: _dt.datetime | None = None,
) -> PeerIdentity:
    """Verify a peer's chain (``chain[0]`` = leaf) against the federation CA.

    Checks, in order: a leaf exists; it is directly issued and signed by
    ``ca_cert``; its validity window covers ``now``; it is not a CA; it is
    not revoked by ``crl`` (which must itself be CA-signed and fresh); it names
    exactly one well-formed SPIFFE identity; its role is in ``allowed_roles``
    and its federation matches. Raises :class:`PeerRejected` otherwise.
    Extra certificates after the leaf are ignored: a run has no intermediates.
    """
    if not chain:
        raise PeerRejected("no_certificate")
    leaf = chain[0]
    when = now if now is not None else _utcnow()
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise PeerRejected("untrusted", "not issued by the federation CA") from exc
    if not ca_cert.not_valid_before_utc <= when <= ca_cert.not_valid_after_utc:
        raise PeerRejected("untrusted", "the federation CA certificate is outside its validity")
    if when < leaf.not_valid_before_utc:
        raise PeerRejected("not_yet_valid", f"valid from {leaf.not_valid_before_utc.isoformat()}")
    if when > leaf.not_valid_after_utc:
        raise PeerRejected("expired", f"expired at {leaf.not_valid_after_utc.isoformat()}")
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:
        raise PeerRejected("untrusted", f"malformed extensions: {exc}") from exc
    if is_ca:
        raise PeerRejected("is_ca", "a CA certificate cannot be a peer")
    if crl is not None:
        _check_crl(crl, ca_cert, when)
        if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            raise PeerRejected("revoked", f"serial {leaf.serial_number:x} is on the CRL")
    try:
        identity = identity_of(leaf)
    except PkiError as exc:
        raise PeerRejected("bad_identity", str(exc)) from exc
    if federation is not None and identity.federation != federation:
        raise PeerRejected("wrong_federation", f"{identity.spiffe_id} is not in {federation}")
    if identity.role not in allowed_roles:
        raise PeerRejected(
            "wrong_role", f"{identity.spiffe_id}: role not in {sorted(allowed_roles)}"
        )
    return identity


# ---------------------------------------------------------------------------- signatures


def sign(key: PrivateKey, data: bytes) -> bytes:
    """Sign ``data``: ECDSA-SHA256 (DER) for EC keys, pure Ed25519 for Ed25519 keys."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise PkiError(f"unsupported signing key type {type(key).__name__}")


def verify_signature(
    public_key_or_cert: PublicKey | x509.Certificate, signature: bytes, data: bytes
) -> None:
    """Verify a :func:`sign` signature; raises :class:`SignatureInvalid` on failure."""
    key: object = public_key_or_cert
    if isinstance(public_key_or_cert, x509.Certificate):
        try:
            key = public_key_or_cert.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SignatureInvalid("certificate public key is unusable") from exc
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            raise PkiError(f"unsupported verification key type {type(key).__name__}")
    except InvalidSignature as exc:
        raise SignatureInvalid("signature does not verify") from exc
