"""PEM files of the federation's PKI: keys (0600), certificates and CRLs, size-bounded."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from secure_xfl.crypto.pki import MAX_PKI_FILE_BYTES, PkiFileError, PrivateKey

__all__ = [
    "load_certificate",
    "load_crl",
    "load_private_key",
    "write_certificate",
    "write_crl",
    "write_private_key",
]


def _atomic_write(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    # The temp file is created by os.open with its final mode (O_EXCL, so never an
    # existing file and never a window with wider permissions), then renamed over
    # the target so readers never see a partial file.
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise PkiFileError(f"{path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_bounded(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_PKI_FILE_BYTES:
                raise PkiFileError(f"{path}: larger than {MAX_PKI_FILE_BYTES} bytes")
            data = fh.read(MAX_PKI_FILE_BYTES + 1)  # bound even if the file grows meanwhile
    except OSError as exc:
        raise PkiFileError(f"{path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PKI_FILE_BYTES:
        raise PkiFileError(f"{path}: larger than {MAX_PKI_FILE_BYTES} bytes")
    return data


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM key, readable by the owner only (0600)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, pem, 0o600)


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load a PEM private key (EC or Ed25519)."""
    data = _read_bounded(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiFileError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PkiFileError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def write_certificate(path: str | os.PathLike[str], cert: x509.Certificate) -> None:
    """Write a PEM certificate (0644: certificates are public)."""
    _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Load one PEM certificate."""
    data = _read_bounded(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiFileError(f"{path}: not a PEM certificate") from exc


def write_crl(path: str | os.PathLike[str], crl: x509.CertificateRevocationList) -> None:
    """Write a PEM CRL (0644)."""
    _atomic_write(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def load_crl(path: str | os.PathLike[str]) -> x509.CertificateRevocationList:
    """Load a PEM CRL (its signature is checked by :func:`verify_peer`, not here)."""
    data = _read_bounded(path)
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiFileError(f"{path}: not a PEM CRL") from exc
