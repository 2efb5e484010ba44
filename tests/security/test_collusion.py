"""Pairwise masks against a colluding aggregator and key holder, on real TenSEAL.

Threat (issue 16): the aggregator holds every client's ciphertext, the key holder the
secret key. Without masks, the two together decrypt any single upload of the packed
preset and read that client's (only lightly noised) update. With masks, each upload
and every partial sum decrypts to residues uniform mod M, unrelated to the update,
while the full cohort's sum unpacks to exactly what the unmasked sum gives, bit for
bit. The key holder's own policy releases only the full masked cohort.

Everything is real: the xfl-packed CKKS context, ed25519 and ECDSA signing keys, the
client's ``seal_vector``, the aggregator's ``Accumulator`` and the ``KeyHolder``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from scipy import stats  # a dependency of dp-accounting

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import TensorLayout, layout_of
from secure_xfl.crypto.cohort import CohortMask
from secure_xfl.crypto.context import (
    generate_context,
    get_preset,
    load_context,
    public_context_bytes,
)
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import EncryptedAggregate, ProtectedUpdate
from secure_xfl.crypto.errors import CodecError, DecryptionRefused
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.masking import SignedMaskKey
from secure_xfl.crypto.packing import QuantSpec, quantise, unpack_vector
from secure_xfl.crypto.protect import seal_vector
from tests.unit.test_masking import chi2_p, fixed_pair

pytestmark = pytest.mark.timeout(180)

RUN, ROUND, EPOCH = "run-1", 2, 0
NUMEL = 20_000
PRESET = get_preset("xfl-packed")
DP = DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=2)
QUANT = QuantSpec.for_dp(DP, max_clients=8)
M = QUANT.mask_modulus
B = QUANT.lane_bits
LAYOUT: TensorLayout = layout_of({"w": torch.zeros(NUMEL)})
#: Slots of one upload: the statistics below run over this many samples.
SLOTS = sum(QUANT.chunk_slots(NUMEL, PRESET.slots))
COS_LIMIT = 5 / math.sqrt(NUMEL)


@functools.cache
def contexts() -> tuple[ts.Context, ts.Context]:
    """(the key holder's secret context, the public one every other party loads)."""
    secret = generate_context(PRESET)
    return secret, load_context(public_context_bytes(secret), require_secret=False)


@dataclass(frozen=True)
class Round:
    """One packed round of ``n`` clients, every upload sealed twice from the same coins."""

    names: tuple[str, ...]
    signing_keys: dict[str, Any]
    vectors: dict[str, np.ndarray]
    masks: dict[str, CohortMask]
    plain: dict[str, ProtectedUpdate]
    masked: dict[str, ProtectedUpdate]

    @property
    def public_keys(self) -> dict[str, Any]:
        return {c: k.public_key() for c, k in self.signing_keys.items()}


def update_vector(i: int) -> np.ndarray:
    """A client-level DP update: clipped to ‖·‖ = C, plus N(0, σ²C²/K) per coordinate."""
    rng = np.random.default_rng(100 + i)
    signal = rng.standard_normal(NUMEL) * np.linspace(0.2, 2.0, NUMEL)  # not isotropic
    signal *= DP.clip_norm / np.linalg.norm(signal)
    return signal + rng.normal(0.0, DP.client_noise_std, NUMEL)


def coins(i: int) -> np.random.Generator:
    """Client i's stochastic-rounding coins: the same for its masked and unmasked seal."""
    return np.random.default_rng(1000 + i)


@functools.cache
def make_round(n: int) -> Round:
    names = tuple(f"c{i}" for i in range(n))
    # Certificate keys as the project issues them (P-256), and Ed25519 for some.
    sks: dict[str, Any] = {
        c: ed25519.Ed25519PrivateKey.generate()
        if i % 3 == 1
        else ec.generate_private_key(ec.SECP256R1())
        for i, c in enumerate(names)
    }
    pairs = {c: fixed_pair(f"collusion/{n}/{c}") for c in names}  # reproducible masks
    keys: list[SignedMaskKey] = []
    for c in names:
        signed = pairs[c].sign(run=RUN, round=ROUND, attempt=EPOCH, client=c, signing_key=sks[c])
        signed.verify(sks[c].public_key(), run=RUN, round=ROUND, attempt=EPOCH, client=c)
        keys.append(signed)
    masks = {c: CohortMask(RUN, ROUND, EPOCH, c, pairs[c], tuple(keys)) for c in names}
    vectors = {c: update_vector(i) for i, c in enumerate(names)}
    _, public = contexts()

    def seal(i: int, c: str, mask: CohortMask | None) -> ProtectedUpdate:
        return seal_vector(
            vectors[c], ctx=public, preset=PRESET, layout=LAYOUT, run=RUN, round=ROUND,
            client=c, signing_key=sks[c], dp=DP, weight=1.0, weighting="client",
            rng=coins(i), quant=QUANT, mask=mask,
        )  # fmt: skip

    plain = {c: seal(i, c, None) for i, c in enumerate(names)}
    masked = {c: seal(i, c, masks[c]) for i, c in enumerate(names)}
    return Round(names, sks, vectors, masks, plain, masked)


def accumulate(r: Round, updates: list[ProtectedUpdate]) -> EncryptedAggregate:
    """The aggregator's sum (tenseal additions inside the real Accumulator)."""
    _, public = contexts()
    pub = r.public_keys
    acc = Accumulator(
        ctx=public, preset=PRESET, run=RUN, round=ROUND, layout_digest=LAYOUT.digest,
        numel=NUMEL, key_for=lambda c: pub[c], weighting="client", quant=QUANT,
    )  # fmt: skip
    for u in updates:
        acc.add(u.encode())  # through the wire form, as uploaded
    return acc.result()


def decrypt_slots(chunks: tuple[bytes, ...]) -> list[np.ndarray]:
    """What aggregator + key holder see when they collude: raw decrypted slot values."""
    secret, _ = contexts()
    return [np.asarray(ts.ckks_vector_from(secret, c).decrypt(), dtype=np.float64) for c in chunks]


def residues(chunks: tuple[bytes, ...]) -> np.ndarray:
    """Decrypted slots rounded and reduced mod M, concatenated (int64 in [0, M))."""
    return np.concatenate([np.mod(np.rint(v).astype(np.int64), M) for v in decrypt_slots(chunks)])


def lanes_as_one_client(values: list[np.ndarray]) -> np.ndarray:
    """The attack: read one upload as if it were a sum of one client (split lanes mod M,
    dequantise) without the range checks that would refuse it."""
    out = []
    for vals, m in zip(values, QUANT.chunk_params(NUMEL, PRESET.slots), strict=True):
        ints = np.mod(np.rint(vals).astype(np.int64), M)
        grid = [(ints >> (j * B)) & ((1 << B) - 1) for j in range(QUANT.lanes)]
        out.append(np.concatenate(grid)[:m].astype(np.float64) * QUANT.step - QUANT.range)
    return np.concatenate(out)


def exact_sum(r: Round, names: tuple[str, ...]) -> np.ndarray:
    """Σ of the clients' quantised levels, dequantised as unpack_sum does (bit for bit)."""
    levels = np.zeros(NUMEL, dtype=np.int64)
    for i, c in enumerate(r.names):
        if c not in names:
            continue
        rng, pos = coins(i), 0
        for m in QUANT.chunk_params(NUMEL, PRESET.slots):
            levels[pos : pos + m] += quantise(r.vectors[c][pos : pos + m], QUANT, rng)
            pos += m
    out = levels.astype(np.float64)
    out *= QUANT.step
    out -= len(names) * QUANT.range
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def lane_bits_look_uniform(res: np.ndarray) -> bool:
    """The top and bottom bit of every lane are set about half the time."""
    tol = 5 * 0.5 / math.sqrt(res.shape[0])
    for j in range(QUANT.lanes):
        lane = (res >> (j * B)) & ((1 << B) - 1)
        for bit in (0, B - 1):
            if abs(float(((lane >> bit) & 1).mean()) - 0.5) > tol:
                return False
    return True


# ------------------------------------------------------------------ masks cancel exactly


@pytest.mark.parametrize("n", [3, 8])
def test_the_masked_aggregate_unpacks_bit_for_bit_like_the_unmasked_one(n: int) -> None:
    r = make_round(n)
    for c in r.names:
        assert r.masked[c].statement.mask == r.masks[c].claim
        assert r.plain[c].statement.mask is None
        assert r.masked[c].chunks != r.plain[c].chunks
    plain = accumulate(r, [r.plain[c] for c in r.names])
    masked = accumulate(r, [r.masked[c] for c in r.names])
    slots = PRESET.slots
    got_plain = unpack_vector(decrypt_slots(plain.chunks), QUANT, n, NUMEL, slots)
    got_masked = unpack_vector(decrypt_slots(masked.chunks), QUANT, n, NUMEL, slots, masked=True)
    assert np.array_equal(got_masked, got_plain)
    # ... and both are exactly the plaintext sum of the quantised updates.
    assert np.array_equal(got_plain, exact_sum(r, r.names))
    truth = np.sum([r.vectors[c] for c in r.names], axis=0)
    assert float(np.max(np.abs(got_masked - truth))) < n * QUANT.step
    # Read without the reduction mod M, the masked sum is not the sum (the masks are there).
    with pytest.raises(CodecError):
        unpack_vector(decrypt_slots(masked.chunks), QUANT, n, NUMEL, slots, masked=False)


# ------------------------------------------------------------------ the collusion


@pytest.mark.parametrize("n", [3, 8])
def test_colluding_aggregator_and_key_holder_learn_nothing_from_one_masked_upload(n: int) -> None:
    r = make_round(n)
    victim = r.names[1]
    truth = r.vectors[victim]
    upload = r.masked[victim]

    # Its slots, rounded and reduced mod M, are uniform mod M ...
    res = residues(upload.chunks)
    assert res.shape == (SLOTS,)
    assert chi2_p(res.astype(np.uint64), M) > 1e-4
    u = res / M
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / SLOTS)
    assert lane_bits_look_uniform(res)

    # ... and its lanes, read as one client's update, are unrelated to the update: as
    # close to it as uniform residues read the same way.
    stolen = lanes_as_one_client(decrypt_slots(upload.chunks))
    assert abs(cosine(stolen, truth)) < COS_LIMIT
    rand = np.random.default_rng(7).integers(0, M, SLOTS, dtype=np.int64).astype(np.float64)
    parts = np.split(rand, np.cumsum(QUANT.chunk_slots(NUMEL, PRESET.slots))[:-1])
    random_read = lanes_as_one_client(parts)
    assert abs(cosine(random_read, truth)) < COS_LIMIT
    # The distribution of the stolen lanes is that of random residues' lanes.
    assert stats.ks_2samp(stolen, random_read).pvalue > 1e-4
    # The key holder's range checks refuse it as a "sum" of one client.
    with pytest.raises(CodecError):
        unpack_vector(decrypt_slots(upload.chunks), QUANT, 1, NUMEL, PRESET.slots, masked=True)


@pytest.mark.parametrize("n", [3, 8])
def test_without_masks_the_same_collusion_reads_the_update(n: int) -> None:
    """The attack works: this is what the masks prevent (the checks above can fail)."""
    r = make_round(n)
    victim = r.names[1]
    truth = r.vectors[victim]
    upload = r.plain[victim]
    stolen = lanes_as_one_client(decrypt_slots(upload.chunks))
    assert cosine(stolen, truth) > 0.9
    # Exactly the victim's quantised update, through the key holder's own unpacking.
    one = unpack_vector(decrypt_slots(upload.chunks), QUANT, 1, NUMEL, PRESET.slots)
    assert np.array_equal(one, exact_sum(r, (victim,))) and np.array_equal(one, stolen)
    # Its slots are far from uniform: every lane's top bit is clear.
    res = residues(upload.chunks)
    assert chi2_p(res.astype(np.uint64), M) < 1e-4
    assert not lane_bits_look_uniform(res)
    assert all(((res >> (j * B + B - 1)) & 1).max() == 0 for j in range(QUANT.lanes))


@pytest.mark.parametrize("n", [3, 8])
def test_a_partial_masked_sum_decrypts_to_uniform_residues(n: int) -> None:
    r = make_round(n)
    for dropped in (r.names[0], r.names[-1]):
        rest = tuple(c for c in r.names if c != dropped)
        partial = accumulate(r, [r.masked[c] for c in rest])
        res = residues(partial.chunks)
        assert chi2_p(res.astype(np.uint64), M) > 1e-4
        assert lane_bits_look_uniform(res)
        read = unpack_vector  # the key holder's unpacking refuses it
        with pytest.raises(CodecError):
            read(decrypt_slots(partial.chunks), QUANT, n - 1, NUMEL, PRESET.slots, masked=True)
        # Read regardless, it says nothing about the partial sum it hides.
        lanes = lanes_as_one_client(decrypt_slots(partial.chunks))
        assert abs(cosine(lanes, exact_sum(r, rest))) < COS_LIMIT
    # The unmasked partial sum, by contrast, is the partial sum.
    rest = r.names[1:]
    plain = accumulate(r, [r.plain[c] for c in rest])
    got = unpack_vector(decrypt_slots(plain.chunks), QUANT, n - 1, NUMEL, PRESET.slots)
    assert np.array_equal(got, exact_sum(r, rest))


# ------------------------------------------------------------------ the key holder's policy


def key_holder(r: Round, state: Path, *, masking: bool = True) -> KeyHolder:
    secret, _ = contexts()
    return KeyHolder(
        ctx=secret,
        preset=PRESET,
        policy=KeyHolderPolicy(run=RUN, min_clients=2, masking=masking),
        client_keys=r.public_keys,
        state_dir=state,
    )


def refusal(kh: KeyHolder, agg: EncryptedAggregate) -> str:
    with pytest.raises(DecryptionRefused) as info:
        kh.decrypt(agg.encode())
    return info.value.reason


def test_the_key_holder_releases_only_the_full_masked_cohort(tmp_path: Path) -> None:
    r = make_round(3)
    kh = key_holder(r, tmp_path / "kh")
    # A masked manifest missing one member: refused before any decryption.
    partial = accumulate(r, [r.masked[c] for c in r.names[:-1]])
    assert refusal(kh, partial) == "incomplete_cohort"
    # An unmasked packed aggregate: this kit requires masks.
    plain = accumulate(r, [r.plain[c] for c in r.names])
    assert refusal(kh, plain) == "not_masked"
    # Masked and unmasked entries mixed: the masks could not cancel.
    mixed = accumulate(r, [*(r.masked[c] for c in r.names[:-1]), r.plain[r.names[-1]]])
    assert refusal(kh, mixed) == "mask_mismatch"
    assert not kh.already_decrypted(RUN, ROUND)  # none of these burnt the round

    # The full masked cohort is released: the exact quantised mean of the updates.
    out = kh.decrypt(accumulate(r, [r.masked[c] for c in r.names]).encode())
    assert out.release.participants == r.names
    assert np.array_equal(out.vector, exact_sum(r, r.names) / 3)
    truth = np.mean([r.vectors[c] for c in r.names], axis=0)
    assert float(np.max(np.abs(out.vector - truth))) < QUANT.step
    assert kh.already_decrypted(RUN, ROUND)
    kh.close()

    # The same unmasked aggregate is released by a key holder whose kit allows it (so
    # the not_masked refusal above is the masking rule, not a broken aggregate).
    lax = key_holder(r, tmp_path / "lax", masking=False)
    assert np.array_equal(lax.decrypt(plain.encode()).vector, out.vector)
    lax.close()
