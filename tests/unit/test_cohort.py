"""A masked round's cohort: relayed keys checked against real X.509 certificates of the
federation CA (substitution, replay, foreign CA, revocation, wrong name or role refused),
the signed :class:`MaskClaim`, the key holder's manifest rule, per-round masks, and the
wrap bound of a masked CKKS sum."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto import pki
from secure_xfl.crypto.cohort import (
    MAX_CERT_BYTES,
    MAX_EPOCH,
    CohortMask,
    MaskClaim,
    check_manifest_masks,
    cohort_to_wire,
    verify_cohort,
)
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.errors import DecryptionRefused, EnvelopeError, MaskError
from secure_xfl.crypto.masking import MASK_REASONS, MaskKeyPair, SignedMaskKey, cohort_digest
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.protect import MASK_WRAP_LOG2_LIMIT
from tests.unit.test_masking import chi2_p, fixed_pair

pytestmark = pytest.mark.timeout(120)

FED = "fed-a"
RUN = "run-1"
ROUND, EPOCH = 3, 1
NAMES = ("c0", "c1", "c2", "c3")
M39 = 1 << 39


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Federation:
    """A federation CA, one client certificate per name, and an empty CRL."""

    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    certs: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]
    crl: x509.CertificateRevocationList

    def issue(self, name: str, role: str = "client") -> tuple[x509.Certificate, Any]:
        return pki.issue_certificate(self.ca, self.ca_key, pki.PeerIdentity(FED, role, name))


def make_federation() -> Federation:
    ca, ca_key = pki.create_ca(FED)
    certs = {
        c: pki.issue_certificate(ca, ca_key, pki.PeerIdentity(FED, "client", c)) for c in NAMES
    }
    return Federation(ca, ca_key, certs, pki.build_crl(ca, ca_key, []))


F = make_federation()


@dataclass
class Members:
    """Every member's mask key pair and signed key for one (run, round, epoch)."""

    pairs: dict[str, MaskKeyPair]
    keys: dict[str, SignedMaskKey]

    def entries(self, names: tuple[str, ...] = NAMES) -> list[tuple[SignedMaskKey, bytes]]:
        return [(self.keys[c], pem(F.certs[c][0])) for c in names]

    def wire(self, names: tuple[str, ...] = NAMES) -> list[list[Any]]:
        # Relayed over the network: through msgpack as the aggregator sends it.
        raw = msgpack.packb(cohort_to_wire(self.entries(names)), use_bin_type=True)
        out: list[list[Any]] = msgpack.unpackb(raw, raw=False)
        return out


def members(round: int = ROUND, epoch: int = EPOCH, run: str = RUN) -> Members:
    pairs = {c: MaskKeyPair.generate() for c in NAMES}
    keys = {
        c: pairs[c].sign(run=run, round=round, attempt=epoch, client=c, signing_key=F.certs[c][1])
        for c in NAMES
    }
    return Members(pairs, keys)


GOOD = members()


def verify(wire: object, *, me: str = "c0", **kw: Any) -> tuple[SignedMaskKey, ...]:
    """verify_cohort as member ``me`` (holding GOOD's pair unless ``own=`` is given)."""
    args: dict[str, Any] = {
        "ca": F.ca, "crl": F.crl, "federation": FED, "run": RUN, "round": ROUND,
        "epoch": EPOCH, "own_name": me, "own": GOOD.pairs[me], "min_size": 3,
    } | kw  # fmt: skip
    return verify_cohort(wire, **args)


def refused(reason: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> MaskError:
    assert reason in MASK_REASONS
    with pytest.raises(MaskError) as info:
        fn(*args, **kw)
    assert info.value.reason == reason, info.value
    return info.value


def with_entry(index: int, key: object, cert: object) -> list[list[Any]]:
    """The good relay with entry ``index`` (sorted by name) replaced."""
    wire = GOOD.wire()
    wire[index] = [key.to_wire() if isinstance(key, SignedMaskKey) else key, cert]
    return wire


# ------------------------------------------------------------------ verify_cohort: accepted


def test_a_good_cohort_of_real_certificates_is_accepted_by_every_member() -> None:
    for own in NAMES:
        got = verify(GOOD.wire(), me=own)
        assert got == tuple(GOOD.keys[c] for c in NAMES)  # sorted by name
    # Relay order does not matter (cohort_to_wire sorts), nor does a missing CRL.
    shuffled = cohort_to_wire(list(reversed(GOOD.entries())))
    assert [e[0][5] for e in shuffled] == list(NAMES)
    assert verify(shuffled, crl=None) == tuple(GOOD.keys[c] for c in NAMES)
    # The smallest cohort the member's kit allows.
    assert len(verify(GOOD.wire(NAMES[:3]))) == 3
    assert len(verify(GOOD.wire(NAMES[:2]), min_size=2)) == 2


# ------------------------------------------------------------------ verify_cohort: refused


def test_a_key_substituted_by_the_relay_is_refused() -> None:
    evil = MaskKeyPair.generate()
    relay_key = ec.generate_private_key(ec.SECP256R1())
    c1_cert = pem(F.certs["c1"][0])
    at: dict[str, Any] = {"run": RUN, "round": ROUND, "attempt": EPOCH, "client": "c1"}
    # Another X25519 key under c1's name, signed by the relay, shown with c1's certificate.
    forged = evil.sign(signing_key=relay_key, **at)
    refused("bad_signature", verify, with_entry(1, forged, c1_cert))
    # ... signed by another member (c2's certificate key), with c1's certificate.
    by_peer = evil.sign(signing_key=F.certs["c2"][1], **at)
    refused("bad_signature", verify, with_entry(1, by_peer, c1_cert))
    # ... c1's genuine signature kept over a swapped key.
    k1 = GOOD.keys["c1"]
    swapped = replace(k1, public_key=evil.public_bytes)
    refused("bad_signature", verify, with_entry(1, swapped, c1_cert))
    # ... signed by the relay with its own aggregator certificate: not a client.
    agg_cert, agg_key = F.issue("aggregator", role="aggregator")
    by_relay = evil.sign(signing_key=agg_key, **at)
    refused("bad_signature", verify, with_entry(1, by_relay, pem(agg_cert)))
    # The verifying client's own entry replaced: by the relay's key ...
    mine = evil.sign(signing_key=relay_key, **(at | {"client": "c0"}))
    refused("bad_signature", verify, with_entry(0, mine, pem(F.certs["c0"][0])))
    # ... or by another key that c0's certificate key did sign (an earlier, crashed
    # session of c0): validly signed, but not the key pair this client holds.
    stale_own = MaskKeyPair.generate().sign(signing_key=F.certs["c0"][1], **(at | {"client": "c0"}))
    refused("bad_key", verify, with_entry(0, stale_own, pem(F.certs["c0"][0])))
    # The untouched cohort still passes: the refusals above are the substitutions.
    verify(GOOD.wire())


def test_a_certificate_of_another_ca_is_refused() -> None:
    other_ca, other_key = pki.create_ca(FED)  # same federation name, impostor CA
    cert, key = pki.issue_certificate(other_ca, other_key, pki.PeerIdentity(FED, "client", "c1"))
    pair = MaskKeyPair.generate()
    signed = pair.sign(run=RUN, round=ROUND, attempt=EPOCH, client="c1", signing_key=key)
    signed.verify(cert, run=RUN, round=ROUND, attempt=EPOCH, client="c1")  # self-consistent
    err = refused("bad_signature", verify, with_entry(1, signed, pem(cert)))
    assert "certificate refused" in str(err)


def test_a_revoked_certificate_is_refused() -> None:
    crl = pki.build_crl(F.ca, F.ca_key, [F.certs["c2"][0].serial_number])
    err = refused("bad_signature", verify, GOOD.wire(), crl=crl)
    assert "c2" in str(err) and "revoked" in str(err)
    # A CRL revoking someone outside the cohort changes nothing.
    outsider, _ = F.issue("c9")
    verify(GOOD.wire(), crl=pki.build_crl(F.ca, F.ca_key, [outsider.serial_number]))
    # A CRL signed by another CA is refused too (fail closed).
    other_ca, other_key = pki.create_ca(FED)
    refused("bad_signature", verify, GOOD.wire(), crl=pki.build_crl(other_ca, other_key, []))


def test_a_certificate_naming_another_client_is_refused() -> None:
    # c2's genuine certificate, key and signature, relabelled as c1's entry.
    pair = MaskKeyPair.generate()
    signed = pair.sign(
        run=RUN, round=ROUND, attempt=EPOCH, client="c1", signing_key=F.certs["c2"][1]
    )
    refused("wrong_client", verify, with_entry(1, signed, pem(F.certs["c2"][0])))
    # A valid client certificate of a non-member, signing under a member's name.
    cert, key = F.issue("c9")
    signed = pair.sign(run=RUN, round=ROUND, attempt=EPOCH, client="c1", signing_key=key)
    refused("wrong_client", verify, with_entry(1, signed, pem(cert)))


def test_a_server_role_certificate_is_refused() -> None:
    for role in ("aggregator", "keyholder"):
        cert, key = F.issue("c1", role=role)  # the member's very name, another role
        signed = MaskKeyPair.generate().sign(
            run=RUN, round=ROUND, attempt=EPOCH, client="c1", signing_key=key
        )
        err = refused("bad_signature", verify, with_entry(1, signed, pem(cert)))
        assert "role" in str(err)


def test_a_cohort_below_the_members_own_minimum_is_refused() -> None:
    refused("bad_cohort", verify, GOOD.wire(NAMES[:2]), min_size=3)
    refused("bad_cohort", verify, GOOD.wire(), min_size=5)
    # Never fewer than two, whatever the kit says: alone, a "mask" is no mask.
    refused("bad_cohort", verify, GOOD.wire(NAMES[:1]), min_size=1)
    refused("bad_cohort", verify, GOOD.wire(NAMES[:1]), min_size=0)


def test_a_cohort_without_the_verifying_client_is_refused() -> None:
    err = refused("bad_cohort", verify, GOOD.wire(NAMES[1:]))
    assert "c0" in str(err)


def test_keys_of_another_round_epoch_or_run_are_replays() -> None:
    for reason, other in [
        ("wrong_round", members(round=ROUND - 1)),
        ("wrong_round", members(round=ROUND + 1)),
        ("wrong_attempt", members(epoch=EPOCH - 1)),
        ("wrong_attempt", members(epoch=EPOCH + 1)),
        ("wrong_run", members(run="run-2")),
    ]:
        # Genuine keys and certificates, only from another context: one replayed peer key.
        refused(reason, verify, with_entry(2, other.keys["c2"], pem(F.certs["c2"][0])))
        # A whole cohort of another round, offered to a client holding that round's pair.
        refused(reason, verify, other.wire(), own=other.pairs["c0"])


def test_duplicate_clients_or_keys_are_refused() -> None:
    wire = GOOD.wire()
    refused("bad_cohort", verify, [*wire, wire[1]])
    # Two names publishing one X25519 key (c2 signs c1's public key as its own).
    c1_pub = GOOD.keys["c1"].public_key
    echo = SignedMaskKey(
        RUN, ROUND, EPOCH, "c2", c1_pub,
        pki.sign(F.certs["c2"][1], replace(GOOD.keys["c2"], public_key=c1_pub).signing_bytes()),
    )  # fmt: skip
    refused("bad_cohort", verify, with_entry(2, echo, pem(F.certs["c2"][0])))


def test_oversized_or_garbage_certificates_are_malformed() -> None:
    key = GOOD.keys["c1"]
    der = F.certs["c1"][0].public_bytes(serialization.Encoding.DER)
    for cert in [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        der,
        pem(F.certs["c1"][0]) + b"\0" * (MAX_CERT_BYTES + 1),
        b"\xff" * (MAX_CERT_BYTES + 1),
        pem(F.certs["c1"][0]).decode(),
        None,
        12,
    ]:
        refused("malformed", verify, with_entry(1, key, cert))
    # Padding up to the limit itself is only bounded, not refused by size.
    padded = pem(F.certs["c1"][0])
    padded += b"\n" * (MAX_CERT_BYTES - len(padded))
    verify(with_entry(1, key, padded))


def test_malformed_entries_are_refused() -> None:
    wire = GOOD.wire()
    k1 = wire[1][0]
    cert = pem(F.certs["c1"][0])
    bads: list[object] = [
        None,
        {},
        b"cohort",
        [],
        [None] * 4,
        [*wire[:3], [k1]],
        [*wire[:3], [k1, cert, cert]],
        [*wire[:3], (k1, cert)],
        [*wire[:3], [k1[:-1], cert]],
        [*wire[:3], [["mask-key", 2, *k1[2:]], cert]],
        [*wire[:3], [[*k1[:4], True, *k1[5:]], cert]],
        [*wire[:3], [[*k1[:7], b""], cert]],
        [*wire[:3], [[*k1[:6], bytes(31), k1[7]], cert]],
        [[None, None]] * 100_001,
    ]
    for bad in bads:
        refused("malformed", verify, bad)


# ------------------------------------------------------------------ MaskClaim


def claim(epoch: int = 2, names: tuple[str, ...] = ("c0", "c1", "c2")) -> MaskClaim:
    return MaskClaim(epoch, names, bytes(range(32)))


def test_mask_claim_round_trips_through_msgpack() -> None:
    c = claim()
    assert c.to_wire() == [2, ["c0", "c1", "c2"], bytes(range(32))]
    back = msgpack.unpackb(msgpack.packb(c.to_wire(), use_bin_type=True), raw=False)
    assert MaskClaim.from_wire(back) == c
    assert MaskClaim.from_wire(claim(0, ("a", "b")).to_wire()) == claim(0, ("a", "b"))
    assert MaskClaim.from_wire(claim(MAX_EPOCH).to_wire()).epoch == MAX_EPOCH
    # The claim of a real cohort: sorted names, its digest.
    keys = tuple(GOOD.keys[c] for c in reversed(NAMES))
    real = CohortMask(RUN, ROUND, EPOCH, "c0", GOOD.pairs["c0"], keys).claim
    assert real == MaskClaim(EPOCH, NAMES, cohort_digest(list(keys)))
    assert MaskClaim.from_wire(real.to_wire()) == real


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [2, ["c0", "c1"]],
        [2, ["c0", "c1"], bytes(32), None],
        (2, ["c0", "c1"], bytes(32)),
        [2, ["c1", "c0"], bytes(32)],  # unsorted
        [2, ["c0", "c0", "c1"], bytes(32)],  # a duplicate
        [2, ["c0", "c1"], bytes(31)],
        [2, ["c0", "c1"], bytes(33)],
        [2, ["c0", "c1"], "0" * 32],
        [True, ["c0", "c1"], bytes(32)],  # bool epoch
        [False, ["c0", "c1"], bytes(32)],
        [2.0, ["c0", "c1"], bytes(32)],
        [-1, ["c0", "c1"], bytes(32)],
        [MAX_EPOCH + 1, ["c0", "c1"], bytes(32)],
        [2, ["c0"], bytes(32)],  # too few names
        [2, [], bytes(32)],
        [2, ("c0", "c1"), bytes(32)],
        [2, ["c0", 1], bytes(32)],
        [2, ["", "c1"], bytes(32)],
        [2, ["c0", "x" * 129], bytes(32)],
        [2, ["c0", b"c1"], bytes(32)],
    ],
)
def test_mask_claim_from_wire_is_strict(bad: object) -> None:
    with pytest.raises(EnvelopeError):
        MaskClaim.from_wire(bad)


# ------------------------------------------------------------------ check_manifest_masks


def statements(c: MaskClaim | None, names: tuple[str, ...]) -> list[SimpleNamespace]:
    return [SimpleNamespace(client=n, mask=c) for n in names]


PACKED = SimpleNamespace(packed=True)
UNPACKED = SimpleNamespace(packed=False)


def manifest_refused(reason: str, sts: list[SimpleNamespace], preset: Any, required: bool) -> None:
    with pytest.raises(DecryptionRefused) as info:
        check_manifest_masks(sts, preset, required)
    assert info.value.reason == reason, info.value


def test_one_claim_over_exactly_its_cohort_passes() -> None:
    c = claim()
    for required in (True, False):
        assert check_manifest_masks(statements(c, ("c2", "c0", "c1")), PACKED, required) == c


def test_mixed_claims_are_a_mask_mismatch() -> None:
    c = claim()
    other_epoch = replace(c, epoch=3)
    other_digest = replace(c, digest=bytes(32))
    for other in (other_epoch, other_digest, None):
        mixed = statements(c, ("c0", "c1")) + statements(other, ("c2",))
        manifest_refused("mask_mismatch", mixed, PACKED, True)
        manifest_refused("mask_mismatch", mixed, PACKED, False)
    # Masked entries under a preset that does not pack: nothing would unmask them.
    manifest_refused("mask_mismatch", statements(c, c.clients), UNPACKED, False)


def test_a_manifest_that_is_not_the_cohort_is_incomplete() -> None:
    c = claim(names=("c0", "c1", "c2", "c3"))
    for names in [
        ("c0", "c1", "c2"),  # a member missing (a partial sum)
        ("c1",),  # one upload alone
        ("c0", "c1", "c2", "c9"),  # a member swapped for a stranger
        ("c0", "c1", "c2", "c3", "c4"),  # an extra entry
    ]:
        manifest_refused("incomplete_cohort", statements(c, names), PACKED, True)
        manifest_refused("incomplete_cohort", statements(c, names), PACKED, False)


def test_unmasked_packed_entries_need_a_kit_that_allows_them() -> None:
    manifest_refused("not_masked", statements(None, ("c0", "c1", "c2")), PACKED, True)
    assert check_manifest_masks(statements(None, ("c0", "c1", "c2")), PACKED, False) is None
    assert check_manifest_masks(statements(None, ("c0", "c1", "c2")), UNPACKED, True) is None
    assert check_manifest_masks(statements(None, ("c0", "c1", "c2")), UNPACKED, False) is None


# ------------------------------------------------------------------ per-round masks


def cohort_masks(round: int, epoch: int, run: str = RUN, n: int = 4000) -> dict[str, np.ndarray]:
    """Every member's CohortMask over ``n`` slots, from the SAME X25519 key pairs in every
    round (the worst case: a client that reused its key pair) and freshly signed keys."""
    pairs = {c: fixed_pair(f"reused/{c}") for c in NAMES}
    keys = tuple(
        pairs[c].sign(run=run, round=round, attempt=epoch, client=c, signing_key=F.certs[c][1])
        for c in NAMES
    )
    return {c: CohortMask(run, round, epoch, c, pairs[c], keys).mask(n, M39) for c in NAMES}


def test_cohort_masks_are_deterministic_per_run_round_and_epoch() -> None:
    a, b = cohort_masks(ROUND, EPOCH), cohort_masks(ROUND, EPOCH)  # new ECDSA signatures
    for c in NAMES:
        assert a[c].dtype == np.uint64 and np.array_equal(a[c], b[c])
        assert int(a[c].max()) < M39 and np.unique(a[c]).size > 3900
    total = np.sum([a[c].astype(object) for c in NAMES], axis=0) % M39
    assert (total == 0).all()


@pytest.mark.parametrize(
    "other", [(ROUND + 1, EPOCH, RUN), (ROUND, EPOCH + 1, RUN), (ROUND, EPOCH, "run-2")]
)
def test_cohort_masks_are_never_reused_across_rounds_epochs_or_runs(
    other: tuple[int, int, str],
) -> None:
    base = cohort_masks(ROUND, EPOCH)
    again = cohort_masks(*other)
    for c in NAMES:
        assert (base[c] == again[c]).mean() < 0.001
        # Not a shifted copy either: the difference is itself uniform mod M.
        diff = (base[c].astype(object) - again[c].astype(object)) % M39
        assert chi2_p(diff.astype(np.uint64), M39) > 1e-4
    # Masks of different rounds do not cancel: a client's upload of one round cannot be
    # unmasked with masks of another.
    mixed = np.sum([base["c0"].astype(object)] + [again[c].astype(object) for c in NAMES[1:]], 0)
    assert (mixed % M39 != 0).mean() > 0.999


def test_seal_checks_bind_the_mask_to_its_context() -> None:
    pairs = {c: fixed_pair(f"reused/{c}") for c in NAMES}
    keys = tuple(
        pairs[c].sign(run=RUN, round=ROUND, attempt=EPOCH, client=c, signing_key=F.certs[c][1])
        for c in NAMES
    )
    # A CohortMask of the wrong client (its own pair missing from the keys) is refused.
    with pytest.raises(MaskError) as info:
        CohortMask(RUN, ROUND, EPOCH, "c0", pairs["c1"], keys).mask(10, M39)
    assert info.value.reason == "bad_key"
    with pytest.raises(MaskError) as info:
        CohortMask(RUN, ROUND + 1, EPOCH, "c0", pairs["c0"], keys).mask(10, M39)
    assert info.value.reason == "wrong_round"


# ------------------------------------------------------------------ wrap bound


DP = DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=2)
N_PACKED = get_preset("xfl-packed").poly_modulus_degree


@pytest.mark.parametrize("max_clients", [8, 64])
def test_masked_wrap_is_negligible_for_the_packed_quantisation(max_clients: int) -> None:
    q = QuantSpec.for_dp(DP, max_clients=max_clients)
    assert MASK_WRAP_LOG2_LIMIT <= -128
    assert q.masked_wrap_log2(N_PACKED) <= -128
    for n in range(2, max_clients + 1):
        assert q.masked_wrap_log2(N_PACKED, n) <= -128
    assert q.masked_wrap_log2(N_PACKED) == q.masked_wrap_log2(N_PACKED, max_clients)


def test_masked_wrap_grows_with_n_times_m() -> None:
    q = QuantSpec.for_dp(DP, max_clients=8)
    by_n = [q.masked_wrap_log2(N_PACKED, n) for n in (2, 3, 4, 8, 16, 32, 64)]
    assert all(a < b for a, b in itertools.pairwise(by_n))
    # The Hoeffding exponent falls as 1/(n·M)²: twice the clients, a quarter of it.
    assert math.isclose(
        1 - q.masked_wrap_log2(N_PACKED, 2), 4 * (1 - q.masked_wrap_log2(N_PACKED, 4)), rel_tol=1e-9
    )
    # The bound is not vacuous: far more clients than the spec was sized for would wrap.
    assert q.masked_wrap_log2(N_PACKED, 32) > MASK_WRAP_LOG2_LIMIT
    assert q.masked_wrap_log2(N_PACKED, 256) > -1
    # Same scale (max_clients 8), a larger lane modulus M: a larger wrap bound.
    specs = [QuantSpec(bits=b, max_clients=8, range=1.0) for b in (9, 10, 17)]
    assert len({s.scale_bits for s in specs}) == 1
    assert [s.mask_modulus for s in specs] == [1 << 36, 1 << 39, 1 << 40]
    wraps = [s.masked_wrap_log2(N_PACKED) for s in specs]
    assert wraps[0] < wraps[1] < wraps[2] <= -128
