"""Who may sign a ledger: the federation's key holder, certified by its CA, unrevoked.

An auditor brings the trust anchor: the federation CA certificate (and its
CRL), from its own kit or from the provisioner, never from whoever ships the
ledger. :func:`verify_signer` then checks that the ledger's signing
certificate chains to that CA, names the ``keyholder`` role *of that CA's
federation*, was valid at every entry's time and is not on the CRL.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from secure_xfl.config import load_config
from secure_xfl.crypto import pem, pki
from secure_xfl.errors import ConfigError
from secure_xfl.privacy.ledger.reader import as_certificate, entry_time

__all__ = ["KitTrust", "ca_federation", "kit_trust", "load_ca", "load_crl", "verify_signer"]

# pki.create_ca names the CA "secure-xfl CA <federation>"; a SPIFFE URI SAN, if a
# CA carries one, takes precedence.
_CA_CN = re.compile(r"secure-xfl CA ([a-z0-9][a-z0-9.-]{0,62})")
_SPIFFE_TRUST_DOMAIN = re.compile(r"spiffe://([a-z0-9][a-z0-9.-]{0,62})/?")


def ca_federation(ca: x509.Certificate) -> str | None:
    """The federation ``ca`` serves: its SPIFFE trust domain (a ``spiffe://<federation>``
    URI SAN) or the one its subject names; None when it names none."""
    try:
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if match := _SPIFFE_TRUST_DOMAIN.fullmatch(uri):
                return match[1]
    except (x509.ExtensionNotFound, ValueError):
        pass
    for attr in ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attr.value, str) and (match := _CA_CN.fullmatch(attr.value)):
            return match[1]
    return None


def load_ca(source: Any) -> x509.Certificate:
    """The CA certificate in ``source`` (path, PEM or object); raises :class:`pki.PkiError`."""
    try:
        cert = as_certificate(source)
    except (OSError, ValueError) as exc:
        raise pki.PkiFileError(f"cannot load the federation CA: {exc}") from exc
    if cert is None:
        raise pki.PkiFileError("the federation CA is not a PEM certificate")
    return cert


def load_crl(source: Any) -> x509.CertificateRevocationList:
    """A CRL from a path, PEM bytes/text or object; raises :class:`pki.PkiError`.

    Its issuer and signature are checked against the CA by :func:`verify_signer`.
    """
    if isinstance(source, x509.CertificateRevocationList):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        source = source.encode("ascii", "replace")
    if isinstance(source, bytes):
        try:
            return x509.load_pem_x509_crl(source[: pki.MAX_PKI_FILE_BYTES])
        except ValueError as exc:
            raise pki.PkiFileError("not a PEM CRL") from exc
    if isinstance(source, str | os.PathLike):
        try:
            return pem.load_crl(source)
        except OSError as exc:
            raise pki.PkiFileError(f"cannot read CRL {os.fspath(source)}: {exc}") from exc
    raise pki.PkiFileError(f"not a CRL: {type(source).__name__}")


def verify_signer(
    cert: Any,
    ca: x509.Certificate,
    entries: Sequence[dict[str, Any]],
    *,
    crl: x509.CertificateRevocationList | None,
    federation: str | None = None,
) -> pki.PeerIdentity:
    """The signer's identity; raises :class:`~secure_xfl.crypto.pki.PkiError` unless
    ``cert`` is a ``keyholder`` certificate issued by ``ca`` in the CA's federation,
    valid at every entry's time and not revoked by ``crl`` (CA-signed, fresh then).

    ``federation`` is the auditor's own idea of the federation (its kit's); it
    must agree with the CA's. A revoked certificate fails every entry: a
    revocation says the key may be in other hands, and such hands could have
    written any line, backdated or not.
    """
    kh = as_certificate(cert)
    if kh is None:
        raise pki.PkiError("a bare public key cannot be checked against the CA; pass the cert")
    served = ca_federation(ca)
    if federation is not None and served is not None and federation != served:
        raise pki.PeerRejected(
            "wrong_federation", f"the CA serves federation {served!r}, not {federation!r}"
        )
    expected = federation or served
    if expected is None:
        raise pki.PkiError("the CA names no federation; pass the kit (its federation name)")
    times = sorted(entry_time(e) for e in entries) or [_dt.datetime.now(_dt.UTC)]
    identity = None
    # Validity is an interval: the first and last entry bound all the others.
    for when in {times[0], times[-1]}:
        identity = pki.verify_peer(
            [kh], ca, crl=crl, allowed_roles={"keyholder"}, federation=expected, now=when
        )
    assert identity is not None
    return identity


@dataclass(frozen=True)
class KitTrust:
    """What an auditor's startup kit supplies (:func:`kit_trust`)."""

    ca: Path
    """``KIT/ca.pem``: the federation CA."""
    crl: Path
    """``KIT/crl.pem``: its revocation list."""
    keyholder_cert: Path | None
    """``KIT/cert.pem`` when the kit is the key holder's (it signs the ledger); else None."""
    federation: str
    """The kit's federation name."""


def kit_trust(kit: str | os.PathLike[str]) -> KitTrust:
    """Trust material of a startup kit; raises :class:`~secure_xfl.errors.ConfigError`
    when ``kit`` is not one."""
    root = Path(kit)
    if not (root / "config.toml").is_file():
        raise ConfigError(f"{root} is not a startup kit (no config.toml)")
    cfg = load_config(root / "config.toml")
    is_kh = cfg.party.role == "keyholder"
    return KitTrust(
        ca=root / "ca.pem",
        crl=root / "crl.pem",
        keyholder_cert=root / "cert.pem" if is_kh else None,
        federation=cfg.federation.name,
    )
