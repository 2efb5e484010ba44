"""Pairwise masks: cancellation, exact sums, PRG determinism and no reuse, uniformity,
signed X25519 keys (substitution and replay refused), strict wire form, no torch."""

from __future__ import annotations

import ast
import hashlib
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats  # a dependency of dp-accounting

from secure_xfl.crypto import masking, pki
from secure_xfl.crypto.errors import EnvelopeError, MaskError
from secure_xfl.crypto.masking import (
    MASK_REASONS,
    MaskKeyPair,
    SignedMaskKey,
    apply_mask,
    client_mask,
    cohort_digest,
    mask_stream,
    pair_seed,
)
from secure_xfl.wire import bounded_unpack

pytestmark = pytest.mark.timeout(120)

RUN = "run-1"
M39 = 1 << 39  # packed lanes: 3 × 13 bits
T20 = 1_032_193  # a BFV plain modulus (prime, ≡ 1 mod 8192)
T40 = masking.BFV_LIKE_MODULUS  # a 40-bit prime just above 2^39: acceptance ≈ 1/2
MODULI = [M39, T20, T40]
SEED = bytes(range(32))
Cohort = tuple[list[str], dict[str, MaskKeyPair], dict[str, Any], list[SignedMaskKey]]


def fixed_pair(label: str) -> MaskKeyPair:
    """A deterministic key pair, so every stream (and p-value) below is reproducible."""
    key = X25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())
    return MaskKeyPair(key, key.public_key().public_bytes_raw())


def cohort(size: int, *, round: int = 0, attempt: int = 0, run: str = RUN) -> Cohort:
    names = [f"client{i}" for i in range(size)]
    pairs = {c: fixed_pair(f"{run}/{round}/{attempt}/{c}") for c in names}
    # Certificate keys as the project issues them (P-256), one Ed25519 for the other branch.
    sks: dict[str, Any] = {
        c: ed25519.Ed25519PrivateKey.generate()
        if i == 1
        else ec.generate_private_key(ec.SECP256R1())
        for i, c in enumerate(names)
    }
    keys = [
        pairs[c].sign(run=run, round=round, attempt=attempt, client=c, signing_key=sks[c])
        for c in names
    ]
    return names, pairs, sks, keys


def masks_of(co: Cohort, n: int, modulus: int, **ctx: Any) -> list[np.ndarray]:
    names, pairs, _, keys = co
    where = {"run": RUN, "round": 0, "attempt": 0} | ctx
    return [client_mask(pairs[c], keys, n=n, modulus=modulus, own_name=c, **where) for c in names]


def refused(reason: str, fn: Any, *args: Any, **kw: Any) -> MaskError:
    assert reason in MASK_REASONS
    with pytest.raises(MaskError) as info:
        fn(*args, **kw)
    assert info.value.reason == reason, info.value
    assert isinstance(info.value, EnvelopeError) and info.value.code == "bad_mask"
    return info.value


def mod_sum(arrays: list[np.ndarray], modulus: int) -> np.ndarray:
    """Exact Σ mod modulus with Python integers (independent of the module's arithmetic)."""
    return np.sum([a.astype(object) for a in arrays], axis=0) % modulus


def chi2_p(values: np.ndarray, modulus: int, buckets: int = 64) -> float:
    idx = np.minimum(
        (values.astype(np.float64) * (buckets / modulus)).astype(np.int64), buckets - 1
    )
    return float(stats.chisquare(np.bincount(idx, minlength=buckets)).pvalue)


def assert_uniform(values: np.ndarray, modulus: int) -> None:
    n = values.shape[0]
    assert chi2_p(values, modulus) > 1e-4
    u = values.astype(np.float64) / modulus
    # Uniform on [0, 1): mean 1/2 (se √(1/12n)), variance 1/12 (se √((1/80 − 1/144)/n)).
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt((1 / 80 - 1 / 144) / n)


# ------------------------------------------------------------------ cancellation, exact sums


@pytest.mark.parametrize("modulus", MODULI)
@pytest.mark.parametrize("size", [3, 8])
def test_masks_of_a_cohort_cancel_exactly(size: int, modulus: int) -> None:
    masks = masks_of(cohort(size), 5000, modulus)
    assert all(m.dtype == np.uint64 and int(m.max()) < modulus for m in masks)
    assert (mod_sum(masks, modulus) == 0).all()
    # Not trivially: each mask is spread over the range and differs from the others.
    assert all(np.unique(m).size > 4000 for m in masks)
    assert all((masks[0] != m).mean() > 0.99 for m in masks[1:])
    # A cohort minus one client does not cancel (the dropout case cannot be unmasked).
    assert (mod_sum(masks[1:], modulus) != 0).mean() > 0.99


def test_the_lower_name_adds_and_the_higher_subtracts() -> None:
    co = cohort(2)
    _, pairs, _, keys = co
    seed = pair_seed(
        pairs["client0"], keys[1], run=RUN, round=0, attempt=0, own_name="client0",
        cohort_digest=cohort_digest(keys),
    )  # fmt: skip
    stream = mask_stream(seed, 1000, T40).astype(object)
    low, high = masks_of(co, 1000, T40)
    assert low.tolist() == stream.tolist()
    assert high.tolist() == ((T40 - stream) % T40).tolist()


@pytest.mark.parametrize("modulus", MODULI)
@pytest.mark.parametrize("size", [3, 8])
def test_masked_values_sum_to_the_plain_sum(size: int, modulus: int) -> None:
    rng = np.random.default_rng(size)
    n = 4000
    # Headroom as in the packing: the true sum of the cohort stays below the modulus.
    values = [rng.integers(0, modulus // size, n, dtype=np.uint64) for _ in range(size)]
    masked = [
        apply_mask(v, m, modulus)
        for v, m in zip(values, masks_of(cohort(size), n, modulus), strict=True)
    ]
    plain = np.sum([v.astype(object) for v in values], axis=0)
    assert (plain < modulus).all()
    assert (mod_sum(masked, modulus) == plain).all()
    assert all((m != v).mean() > 0.99 for m, v in zip(masked, values, strict=True))


def test_apply_mask_does_not_overflow_near_2_62() -> None:
    top = 1 << 62
    values = np.array([top - 1, top - 1, 0, 5], dtype=np.uint64)
    mask = np.array([top - 1, 1, 0, top - 3], dtype=np.uint64)
    want = [(int(v) + int(m)) % top for v, m in zip(values, mask, strict=True)]
    assert apply_mask(values, mask, top).tolist() == want
    stream = mask_stream(SEED, 20000, top)
    assert int(stream.max()) < top and int(stream.max()) > top // 2


# ------------------------------------------------------------------ PRG: determinism, no reuse


def test_pair_seed_is_symmetric_and_deterministic() -> None:
    _, pairs, _, keys = cohort(3)
    dig = cohort_digest(keys)
    where = {"run": RUN, "round": 0, "attempt": 0, "cohort_digest": dig}
    ab = pair_seed(pairs["client0"], keys[1], own_name="client0", **where)
    ba = pair_seed(pairs["client1"], keys[0], own_name="client1", **where)
    assert ab == ba and len(ab) == 32
    assert ab == pair_seed(pairs["client0"], keys[1], own_name="client0", **where)
    ac = pair_seed(pairs["client0"], keys[2], own_name="client0", **where)
    bc = pair_seed(pairs["client1"], keys[2], own_name="client1", **where)
    assert len({ab, ac, bc}) == 3
    streams = [mask_stream(s, 1000, T40) for s in (ab, ac, bc)]
    assert all((streams[0] != s).mean() > 0.99 for s in streams[1:])
    assert (streams[1] != streams[2]).mean() > 0.99


def test_same_key_pairs_in_another_round_attempt_or_cohort_give_unrelated_seeds() -> None:
    """Even if a client reused its X25519 pair, the HKDF binding separates the seeds."""
    a, b, c = fixed_pair("a"), fixed_pair("b"), fixed_pair("c")

    def seed(run: str = RUN, round: int = 0, attempt: int = 0, third: bool = False) -> bytes:
        sk = ec.generate_private_key(ec.SECP256R1())
        keys = [
            p.sign(run=run, round=round, attempt=attempt, client=name, signing_key=sk)
            for p, name in [(a, "alice"), (b, "bob"), (c, "carol")][: 3 if third else 2]
        ]
        dig = cohort_digest(keys)
        return pair_seed(
            a, keys[1], run=run, round=round, attempt=attempt, own_name="alice", cohort_digest=dig
        )

    base = seed()
    assert base == seed()  # deterministic per (run, round, attempt, pair, cohort)
    others = [seed(round=1), seed(attempt=1), seed(third=True), seed(run="run-2")]
    assert len({base, *others}) == 5
    ref = mask_stream(base, 2000, M39)
    for s in others:
        assert (mask_stream(s, 2000, M39) != ref).mean() > 0.99


def test_each_hkdf_binding_separates_seeds_on_its_own() -> None:
    """Same key pairs, same cohort digest: run, round and attempt alone change the seed."""
    a, b = fixed_pair("a"), fixed_pair("b")
    sk = ec.generate_private_key(ec.SECP256R1())

    def seed(run: str = RUN, round: int = 0, attempt: int = 0, dig: bytes = bytes(32)) -> bytes:
        peer = b.sign(run=run, round=round, attempt=attempt, client="bob", signing_key=sk)
        where = {"run": run, "round": round, "attempt": attempt}
        return pair_seed(a, peer, own_name="alice", cohort_digest=dig, **where)

    base = seed()
    others = [seed(run="run-2"), seed(round=1), seed(attempt=1), seed(dig=bytes(31) + b"\1")]
    assert len({base, *others}) == 5
    # The names are bound too: the same two keys under other names give another seed.
    peer = b.sign(run=RUN, round=0, attempt=0, client="bob2", signing_key=sk)
    where = {"run": RUN, "round": 0, "attempt": 0, "cohort_digest": bytes(32)}
    assert pair_seed(a, peer, own_name="alice", **where) != base


def test_pair_seed_is_hkdf_of_the_x25519_secret_and_needs_the_private_key() -> None:
    a, b = fixed_pair("a"), fixed_pair("b")
    sk = ec.generate_private_key(ec.SECP256R1())
    peer = b.sign(run=RUN, round=3, attempt=1, client="bob", signing_key=sk)
    where = {"run": RUN, "round": 3, "attempt": 1, "cohort_digest": bytes(range(32))}
    got = pair_seed(a, peer, own_name="alice", **where)
    info = ["secure-xfl/pair-seed/v1", RUN, 3, 1, "alice", a.public_bytes, "bob", b.public_bytes]
    hkdf = HKDF(hashes.SHA256(), 32, salt=None, info=msgpack.packb([*info, bytes(range(32))]))
    assert got == hkdf.derive(
        a.private_key.exchange(X25519PublicKey.from_public_bytes(b.public_bytes))
    )
    # Someone holding alice's public key but not her private key derives another seed.
    impostor = MaskKeyPair(fixed_pair("eve").private_key, a.public_bytes)
    assert pair_seed(impostor, peer, own_name="alice", **where) != got


def test_mask_stream_is_deterministic_prefix_consistent_and_in_range() -> None:
    for modulus in [2, 3, T20, M39, T40, (1 << 62) - 57, 1 << 62]:
        long = mask_stream(SEED, 300_000, modulus)
        assert (mask_stream(SEED, 1234, modulus) == long[:1234]).all()
        assert (mask_stream(SEED, 300_000, modulus) == long).all()
        assert int(long.max()) < modulus and long.dtype == np.uint64
    assert mask_stream(SEED, 0, T40).shape == (0,)
    other = bytes([1]) + SEED[1:]
    assert (mask_stream(other, 1000, T40) != mask_stream(SEED, 1000, T40)).mean() > 0.99


@pytest.mark.parametrize("modulus", [3, T20, T40, M39])
def test_mask_stream_matches_the_specified_rejection_sampler(modulus: int) -> None:
    """Little-endian 64-bit ChaCha20 words cut to bitlen(M − 1) bits, kept if < M."""
    n = 3000
    enc = Cipher(algorithms.ChaCha20(SEED, bytes(16)), mode=None).encryptor()
    ks = enc.update(bytes(8 * 4 * n))
    k = (modulus - 1).bit_length()
    words = (int.from_bytes(ks[i : i + 8], "little") & ((1 << k) - 1) for i in range(0, len(ks), 8))
    want = [w for w in words if w < modulus][:n]
    assert mask_stream(SEED, n, modulus).tolist() == want


# ------------------------------------------------------------------ uniformity


@pytest.mark.parametrize("modulus", MODULI)
def test_one_masked_upload_is_uniform(modulus: int) -> None:
    n = 200_000
    mask = masks_of(cohort(3), n, modulus)[0]
    assert_uniform(mask, modulus)
    # Constant input (the most structured update there is): still uniform.
    constant = np.full(n, modulus // 3, dtype=np.uint64)
    masked = apply_mask(constant, mask, modulus)
    assert_uniform(masked, modulus)
    # A ramp input: the masked vector is uncorrelated with it.
    ramp = (np.arange(n, dtype=np.uint64) * np.uint64(7919)) % np.uint64(modulus)
    masked = apply_mask(ramp, mask, modulus)
    assert_uniform(masked, modulus)
    assert abs(np.corrcoef(ramp.astype(float), masked.astype(float))[0, 1]) < 5 / np.sqrt(n)


def test_uniformity_check_can_fail() -> None:
    """The checks above catch a biased sampler, a half-range mask and cancelled masks."""
    n = 200_000
    raw = np.frombuffer(
        Cipher(algorithms.ChaCha20(SEED, bytes(16)), mode=None).encryptor().update(bytes(8 * n)),
        dtype="<u8",
    )
    # Reduction mod M instead of rejection: [0, 2^20 − M) comes up twice as often.
    biased = (raw & np.uint64((1 << 20) - 1)) % np.uint64(T20)
    assert chi2_p(biased, T20) < 1e-4
    half = mask_stream(SEED, n, T40 // 2)  # uniform, but on half the range
    assert chi2_p(apply_mask(np.zeros(n, dtype=np.uint64), half, T40), T40) < 1e-4
    masks = masks_of(cohort(2), n, T40)
    constant = np.full(n, 12345, dtype=np.uint64)
    # Both clients' masks together cancel: what is left is the constant, far from uniform.
    both = apply_mask(apply_mask(constant, masks[0], T40), masks[1], T40)
    assert (both == constant).all() and chi2_p(both, T40) < 1e-4
    with pytest.raises(AssertionError):
        assert_uniform(biased, T20)


# ------------------------------------------------------------------ signed keys


def test_signed_key_verifies_against_a_real_certificate() -> None:
    ca_cert, ca_key = pki.create_ca("fed-a")
    cert, key = pki.issue_certificate(ca_cert, ca_key, pki.PeerIdentity("fed-a", "client", "c1"))
    signed = MaskKeyPair.generate().sign(run=RUN, round=4, attempt=1, client="c1", signing_key=key)
    signed.verify(cert, run=RUN, round=4, attempt=1, client="c1")
    other_cert, _ = pki.issue_certificate(
        ca_cert, ca_key, pki.PeerIdentity("fed-a", "client", "c2")
    )
    refused("bad_signature", signed.verify, other_cert, run=RUN, round=4, attempt=1)


def test_substituted_or_replayed_keys_are_refused() -> None:
    names, pairs, sks, keys = cohort(3, round=5)
    pub = {c: sks[c].public_key() for c in names}
    at = {"run": RUN, "round": 5, "attempt": 0}
    for k in keys:
        k.verify(pub[k.client], client=k.client, **at)
    k0 = keys[0]
    evil = MaskKeyPair.generate()
    # The aggregator swaps client0's X25519 key for its own, keeping the signature.
    swapped = SignedMaskKey(
        k0.run, k0.round, k0.attempt, k0.client, evil.public_bytes, k0.signature
    )
    refused("bad_signature", swapped.verify, pub["client0"], **at)
    # ... or signs the swapped key with its own certificate key.
    agg_key = ec.generate_private_key(ec.SECP256R1())
    resigned = evil.sign(client="client0", signing_key=agg_key, **at)
    refused("bad_signature", resigned.verify, pub["client0"], **at)
    # ... or relabels client1's genuine key as client0's.
    k1 = keys[1]
    relabelled = SignedMaskKey(k1.run, k1.round, k1.attempt, "client0", k1.public_key, k1.signature)
    refused("bad_signature", relabelled.verify, pub["client0"], **at)
    refused("wrong_client", k1.verify, pub["client1"], client="client0", **at)
    # Replays of a genuine key in another round, attempt or run.
    refused("wrong_round", k0.verify, pub["client0"], run=RUN, round=6, attempt=0)
    refused("wrong_attempt", k0.verify, pub["client0"], run=RUN, round=5, attempt=1)
    refused("wrong_run", k0.verify, pub["client0"], run="run-2", round=5, attempt=0)
    # A client (or anyone) publishing a low-order point, correctly signed: refused.
    bad = SignedMaskKey(RUN, 5, 0, "client0", bytes(32), b"x")
    low = SignedMaskKey(
        RUN, 5, 0, "client0", bytes(32), pki.sign(sks["client0"], bad.signing_bytes())
    )
    refused("bad_key", low.verify, pub["client0"], **at)
    refused(
        "bad_key",
        pair_seed,
        pairs["client1"],
        low,
        own_name="client1",
        cohort_digest=bytes(32),
        **at,
    )
    # The relay hands a client a cohort where its own entry carries another key.
    forged = [swapped, *keys[1:]]
    refused(
        "bad_key",
        client_mask,
        pairs["client0"],
        forged,
        n=10,
        modulus=M39,
        own_name="client0",
        **at,
    )
    refused(
        "bad_cohort",
        client_mask,
        pairs["client0"],
        keys[1:],
        n=10,
        modulus=M39,
        own_name="client0",
        **at,
    )
    # A peer echoing this client's own key back.
    echo = SignedMaskKey(RUN, 5, 0, "client1", pairs["client0"].public_bytes, b"x")
    refused(
        "bad_key",
        pair_seed,
        pairs["client0"],
        echo,
        own_name="client0",
        cohort_digest=bytes(32),
        **at,
    )
    refused(
        "bad_cohort",
        pair_seed,
        pairs["client0"],
        k0,
        own_name="client0",
        cohort_digest=bytes(32),
        **at,
    )
    # A key of another round inside a cohort, or as a peer: refused before any seed.
    stale = cohort(3, round=4)[3]
    refused("wrong_round", cohort_digest, [*keys[:2], stale[2]])
    refused(
        "wrong_round",
        pair_seed,
        pairs["client0"],
        stale[1],
        own_name="client0",
        cohort_digest=bytes(32),
        **at,
    )


def test_cohort_digest_names_exactly_the_cohort() -> None:
    _, pairs, sks, keys = cohort(4)
    dig = cohort_digest(keys)
    assert len(dig) == 32 and dig == cohort_digest(list(reversed(keys)))
    # Signatures are not part of it: a fresh (randomised) ECDSA signature, same digest.
    again = pairs["client0"].sign(
        run=RUN, round=0, attempt=0, client="client0", signing_key=sks["client0"]
    )
    assert again.signature != keys[0].signature
    assert cohort_digest([again, *keys[1:]]) == dig
    assert cohort_digest(keys[:3]) != dig  # a cohort minus one client
    other = MaskKeyPair.generate().sign(
        run=RUN, round=0, attempt=0, client="client0", signing_key=sks["client0"]
    )
    assert cohort_digest([other, *keys[1:]]) != dig  # one key changed
    assert cohort_digest(cohort(4, attempt=1)[3]) != dig
    refused("bad_cohort", cohort_digest, keys[:1])
    twice = MaskKeyPair.generate().sign(
        run=RUN, round=0, attempt=0, client="client0", signing_key=sks["client0"]
    )
    refused("bad_cohort", cohort_digest, [*keys, twice])  # one name, two keys
    dup = pairs["client0"].sign(
        run=RUN, round=0, attempt=0, client="client9", signing_key=sks["client0"]
    )
    refused("bad_cohort", cohort_digest, [*keys, dup])
    refused("wrong_attempt", cohort_digest, [*keys[:3], cohort(4, attempt=1)[3][3]])


# ------------------------------------------------------------------ wire form


def test_wire_roundtrip_through_msgpack() -> None:
    for key in cohort(2)[3]:
        wire = key.to_wire()
        assert wire[:2] == ["mask-key", 1]
        back = SignedMaskKey.from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True)))
        assert back == key
        assert back.signing_bytes() == key.signing_bytes()


JUNK: list[object] = [
    None, True, False, -1, 0, 2**31 + 1, 2**64, 1.5, float("nan"), "", "x" * 200, "a b", "évil",
    b"", bytes(31), bytes(33), bytes(513), [], {}, ["mask-key"], object(),
]  # fmt: skip


def test_malformed_wire_forms_are_typed_errors() -> None:
    good = cohort(2)[3][0].to_wire()
    bad: list[object] = [None, "mask-key", good[:-1], [*good, b"x"], {"a": 1}, tuple(good)]
    bad += [["mask-key", v, *good[2:]] for v in [0, 2, True, 1.0, "1", None]]
    bad += [["mask-kez", *good[1:]]]
    for obj in bad:
        refused("malformed", SignedMaskKey.from_wire, obj)
    invalid: dict[int, list[object]] = {
        0: ["mask-kez", None, 1, b"mask-key"],
        2: ["", "x" * 129, "a b", "évil", "-run", b"run", 1, None],
        3: [-1, 2**31 + 1, 2**64, True, 1.5, "1", None],
        4: [-1, 2**31 + 1, 2**64, False, 0.0, "0", None],
        5: ["", "x" * 129, "a b", "c/../évil", ".c", b"c", 1, None],
        6: [b"", bytes(31), bytes(33), "k" * 32, bytearray(32), None, 0],
        7: [b"", bytes(513), "s", bytearray(b"s"), None, 0],
    }
    for pos, values in invalid.items():
        for value in values:
            refused("malformed", SignedMaskKey.from_wire, [*good[:pos], value, *good[pos + 1 :]])
    rng = random.Random(16)
    for pos in range(len(good)):
        for junk in JUNK:
            mutated = list(good)
            mutated[pos] = junk
            try:
                SignedMaskKey.from_wire(mutated)
            except MaskError as exc:
                assert exc.reason == "malformed"
    for _ in range(300):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 120)))
        try:
            obj = bounded_unpack(data, error=MaskError, what="mask key", max_bin_len=64,
                                 max_str_len=256, max_array_len=16, max_map_len=4)  # fmt: skip
        except MaskError:
            continue
        with pytest.raises(MaskError):
            SignedMaskKey.from_wire(obj)


def test_impossible_requests_are_typed_errors() -> None:
    for modulus in [0, 1, (1 << 62) + 1, True, 2.0**39, "7"]:
        refused("bad_request", mask_stream, SEED, 10, modulus)
    refused("malformed", mask_stream, SEED[:31], 10, M39)
    refused("malformed", mask_stream, SEED, -1, M39)
    refused("malformed", mask_stream, SEED, 1.0, M39)
    ok = np.zeros(4, dtype=np.uint64)
    refused("bad_request", apply_mask, ok, np.full(4, M39, dtype=np.uint64), M39)
    refused("bad_request", apply_mask, np.full(4, M39, dtype=np.uint64), ok, M39)
    refused("bad_request", apply_mask, ok.astype(np.int64), ok, M39)
    refused("bad_request", apply_mask, ok, ok[:3], M39)
    refused("bad_request", apply_mask, ok.reshape(2, 2), ok.reshape(2, 2), M39)
    _, pairs, _, keys = cohort(2)
    at = {"run": RUN, "round": 0, "attempt": 0, "own_name": "client0"}
    refused("bad_request", client_mask, pairs["client0"], keys, n=4, modulus=1, **at)
    refused("malformed", pair_seed, pairs["client0"], keys[1], cohort_digest=b"short", **at)
    refused("malformed", SignedMaskKey, RUN, -1, 0, "c", bytes(32), b"s")


# ------------------------------------------------------------------ shape of the module


def test_module_imports_no_torch() -> None:
    path = Path(masking.__file__)
    tree = ast.parse(path.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "torch"]
    code = "import sys, secure_xfl.crypto.masking; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_mask_throughput_reports_rows() -> None:
    rows = masking.mask_throughput(numel=20_000, cohorts=(3,), moduli=(M39, T40), repeats=1)
    assert [(r["clients"], r["modulus"]) for r in rows] == [(3, M39), (3, T40)]
    assert all(r["params_per_s"] > 0 and r["numel"] == 20_000 for r in rows)
