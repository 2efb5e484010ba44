"""PKI: identities, issuance, CRLs, peer verification (each refusal reason), files."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from secure_xfl.crypto import pem, pki
from secure_xfl.errors import CryptoError

pytestmark = pytest.mark.timeout(30)
FED = "fed-a"
NOW = dt.datetime.now(dt.UTC)
Ca = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@pytest.fixture(scope="module")
def ca() -> Ca:
    return pki.create_ca(FED)


def leaf(ca: Ca, role: str = "client", **kw: Any) -> Ca:
    return pki.issue_certificate(ca[0], ca[1], pki.PeerIdentity(FED, role, "c1"), **kw)


def test_identity_roundtrip_and_strict_parse() -> None:
    ident = pki.PeerIdentity(FED, "aggregator", "agg-1.eu_west")
    assert ident.spiffe_id == "spiffe://fed-a/aggregator/agg-1.eu_west"
    assert pki.PeerIdentity.parse(ident.spiffe_id) == ident
    for bad in [
        "spiffe://fed-a/aggregator",
        "spiffe://fed-a/aggregator/a/b",
        "spiffe://fed-a/admin/x",
        "spiffe://fed-a:443/client/x",
        "spiffe://fed-a/client/X",
        "spiffe://fed-a/client/-x",
        "spiffe://fed-a/client/x?y=1",
        "https://fed-a/client/x",
        "spiffe://fed-a/client/" + "a" * 64,
    ]:
        with pytest.raises(pki.PkiError):
            pki.PeerIdentity.parse(bad)


def test_issue_and_verify(ca: Ca) -> None:
    cert, key = leaf(ca)
    assert isinstance(key.curve, ec.SECP256R1)
    assert pki.identity_of(cert) == pki.PeerIdentity(FED, "client", "c1")
    got = pki.verify_peer([cert], ca[0], crl=None, allowed_roles={"client"}, federation=FED)
    assert got.role == "client"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert len(list(eku)) == 2
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def _reason(ca: Ca, chain: list[x509.Certificate], **kw: Any) -> str:
    kw.setdefault("crl", None)
    kw.setdefault("allowed_roles", {"client"})
    with pytest.raises(pki.PeerRejected) as info:
        pki.verify_peer(chain, ca[0], **kw)
    assert isinstance(info.value, CryptoError)
    return info.value.reason


def test_each_rejection_reason(ca: Ca) -> None:
    cert, _ = leaf(ca)
    other_ca = pki.create_ca(FED)
    assert _reason(ca, []) == "no_certificate"
    assert _reason(ca, [leaf(other_ca)[0]]) == "untrusted"
    old = leaf(ca, not_before=NOW - dt.timedelta(days=9), not_after=NOW - dt.timedelta(days=1))
    assert _reason(ca, [old[0]]) == "expired"
    early = leaf(ca, not_before=NOW + dt.timedelta(days=1))
    assert _reason(ca, [early[0]]) == "not_yet_valid"
    assert _reason(ca, [ca[0]]) == "is_ca"
    revoked = pki.build_crl(ca[0], ca[1], [cert.serial_number])
    assert _reason(ca, [cert], crl=revoked) == "revoked"
    foreign_crl = pki.build_crl(other_ca[0], other_ca[1], [])
    assert _reason(ca, [cert], crl=foreign_crl) == "bad_crl"
    assert _reason(ca, [cert], allowed_roles={"aggregator"}) == "wrong_role"
    assert _reason(ca, [cert], federation="fed-b") == "wrong_federation"
    # A clean CRL does not reject.
    clean = pki.build_crl(ca[0], ca[1], [cert.serial_number + 1])
    pki.verify_peer([cert], ca[0], crl=clean, allowed_roles={"client"})


def test_identity_requires_exactly_one_spiffe_uri(ca: Ca) -> None:
    cert, _ = leaf(ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca[0].subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    twice = builder.add_extension(
        x509.SubjectAlternativeName(
            [
                x509.UniformResourceIdentifier("spiffe://fed-a/client/a"),
                x509.UniformResourceIdentifier("spiffe://fed-a/aggregator/b"),
            ]
        ),
        critical=False,
    ).sign(ca[1], hashes.SHA256())
    with pytest.raises(pki.PkiError):
        pki.identity_of(twice)
    assert _reason(ca, [twice]) == "bad_identity"
    none = builder.sign(ca[1], hashes.SHA256())
    with pytest.raises(pki.PkiError):
        pki.identity_of(none)


def test_signatures_ecdsa_and_ed25519(ca: Ca) -> None:
    cert, key = leaf(ca)
    sig = pki.sign(key, b"digest")
    pki.verify_signature(cert, sig, b"digest")
    pki.verify_signature(key.public_key(), sig, b"digest")
    with pytest.raises(pki.SignatureInvalid):
        pki.verify_signature(cert, sig, b"tampered")
    ed = ed25519.Ed25519PrivateKey.generate()
    pki.verify_signature(ed.public_key(), pki.sign(ed, b"x"), b"x")
    with pytest.raises(pki.SignatureInvalid):
        pki.verify_signature(ed.public_key(), b"\0" * 64, b"x")


def test_files_roundtrip_and_key_mode(ca: Ca, tmp_path: Path) -> None:
    cert, key = leaf(ca)
    key_path = tmp_path / "c1.key"
    old_umask = os.umask(0)  # the mode must come from os.open, not from the umask
    try:
        pem.write_private_key(key_path, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    pem.write_private_key(key_path, key)  # overwrite keeps 0600
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = pem.load_private_key(key_path)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()
    pem.write_certificate(tmp_path / "c1.pem", cert)
    assert pem.load_certificate(tmp_path / "c1.pem") == cert
    crl = pki.build_crl(ca[0], ca[1], [5, 7])
    pem.write_crl(tmp_path / "crl.pem", crl)
    assert pem.load_crl(tmp_path / "crl.pem").get_revoked_certificate_by_serial_number(7)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("loader", [pem.load_certificate, pem.load_private_key, pem.load_crl])
def test_garbage_files_raise_typed_errors(loader: Callable[[Path], object], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    with pytest.raises(pki.PkiFileError):
        loader(garbage)
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"A" * (pki.MAX_PKI_FILE_BYTES + 1))
    with pytest.raises(pki.PkiFileError):
        loader(huge)
    with pytest.raises(pki.PkiFileError):
        loader(tmp_path / "missing.pem")
