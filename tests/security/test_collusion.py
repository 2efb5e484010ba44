"""Pairwise masks against a colluding aggregator and key holder, on real TenSEAL.

Threat (issue 16): the aggregator holds every client's ciphertext, the key holder the
secret key. Without masks, the two together decrypt any single upload of a packed
preset and read that client's (only lightly noised) update. With masks, each upload
and every partial sum decrypts to residues uniform mod M, unrelated to the update,
while the full cohort's sum unpacks to exactly what the unmasked sum gives, bit for
bit. The key holder's own policy releases only the full masked cohort.

Both packed schemes run every test: ``xfl-packed`` (CKKS: masked residues centred,
decrypted slots rounded) and ``bfv-lanes`` (BFV: residues in [0, M) inside slots mod
a prime t, exact). Everything is real: the contexts the key holder provisions, ed25519
and ECDSA signing keys, the client's ``seal_vector``, the aggregator's ``Accumulator``,
the key holder's ``load_packed``/``decrypt_packed`` and the ``KeyHolder``.
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
from secure_xfl.crypto.context import CKKSPreset, get_preset, load_context, public_context_bytes
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import EncryptedAggregate, ProtectedUpdate
from secure_xfl.crypto.errors import CodecError, DecryptionRefused
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.lanes import (
    bfv_layout,
    chunk_slots,
    decrypt_packed,
    load_packed,
    mask_modulus,
    new_context,
)
from secure_xfl.crypto.masking import SignedMaskKey
from secure_xfl.crypto.packing import QuantSpec, quantise
from secure_xfl.crypto.protect import seal_vector
from tests.unit.test_masking import chi2_p, fixed_pair

pytestmark = pytest.mark.timeout(180)

RUN, ROUND, EPOCH = "run-1", 2, 0
NUMEL = 20_000
DP = DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=2)
QUANT = QuantSpec.for_dp(DP, max_clients=8)
B = QUANT.lane_bits
LAYOUT: TensorLayout = layout_of({"w": torch.zeros(NUMEL)})
COS_LIMIT = 5 / math.sqrt(NUMEL)
SCHEMES = ("xfl-packed", "bfv-lanes")


@dataclass(frozen=True)
class Scheme:
    """One packed preset as the colluders see it: how its slots hold lanes."""

    preset: CKKSPreset
    """The preset (CKKS or BFV lanes)."""
    secret: ts.Context
    """The key holder's secret context."""
    public: ts.Context
    """The public copy every other party loads."""
    lanes: int
    """Quantised values per slot."""
    modulus: int
    """``M``: masks are added, and the key holder reduces, mod this."""
    plain_modulus: int | None
    """BFV's ``t`` (decrypted slots are mod t); ``None`` for CKKS."""
    chunk_params: tuple[int, ...]
    """Parameters per ciphertext."""
    coin_chunks: tuple[int, ...]
    """The pieces ``seal_packed`` quantises in turn (its draws of rounding coins)."""

    @property
    def slots(self) -> list[int]:
        """Slots each ciphertext of an update uses."""
        return chunk_slots(self.preset, QUANT, NUMEL)

    @property
    def total_slots(self) -> int:
        """Slots of one upload: the statistics below run over this many samples."""
        return sum(self.slots)


@functools.cache
def scheme(name: str) -> Scheme:
    preset = get_preset(name)
    # As provisioning does: the key holder's context, then the public copy by its bytes.
    secret = new_context(preset, QUANT)
    public = load_context(public_context_bytes(secret), require_secret=False)
    if preset.scheme == "bfv":
        lay = bfv_layout(preset, QUANT)
        return Scheme(
            preset, secret, public, lay.lanes, mask_modulus(preset, QUANT), lay.plain_modulus,
            tuple(lay.chunk_params(NUMEL)), (NUMEL,),  # pack_bfv quantises the whole update
        )  # fmt: skip
    params = tuple(QUANT.chunk_params(NUMEL, preset.slots))
    return Scheme(
        preset, secret, public, QUANT.lanes, mask_modulus(preset, QUANT), None, params, params
    )


@dataclass(frozen=True)
class Round:
    """One packed round of ``n`` clients, every upload sealed twice from the same coins."""

    s: Scheme
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
def make_round(name: str, n: int) -> Round:
    s = scheme(name)
    names = tuple(f"c{i}" for i in range(n))
    # Certificate keys as the project issues them (P-256), and Ed25519 for some.
    sks: dict[str, Any] = {
        c: ed25519.Ed25519PrivateKey.generate()
        if i % 3 == 1
        else ec.generate_private_key(ec.SECP256R1())
        for i, c in enumerate(names)
    }
    pairs = {c: fixed_pair(f"collusion/{name}/{n}/{c}") for c in names}  # reproducible masks
    keys: list[SignedMaskKey] = []
    for c in names:
        signed = pairs[c].sign(run=RUN, round=ROUND, attempt=EPOCH, client=c, signing_key=sks[c])
        signed.verify(sks[c].public_key(), run=RUN, round=ROUND, attempt=EPOCH, client=c)
        keys.append(signed)
    masks = {c: CohortMask(RUN, ROUND, EPOCH, c, pairs[c], tuple(keys)) for c in names}
    vectors = {c: update_vector(i) for i, c in enumerate(names)}

    def seal(i: int, c: str, mask: CohortMask | None) -> ProtectedUpdate:
        return seal_vector(
            vectors[c], ctx=s.public, preset=s.preset, layout=LAYOUT, run=RUN, round=ROUND,
            client=c, signing_key=sks[c], dp=DP, weight=1.0, weighting="client",
            rng=coins(i), quant=QUANT, mask=mask,
        )  # fmt: skip

    plain = {c: seal(i, c, None) for i, c in enumerate(names)}
    masked = {c: seal(i, c, masks[c]) for i, c in enumerate(names)}
    return Round(s, names, sks, vectors, masks, plain, masked)


def accumulate(r: Round, updates: list[ProtectedUpdate]) -> EncryptedAggregate:
    """The aggregator's sum (tenseal additions inside the real Accumulator)."""
    pub = r.public_keys
    acc = Accumulator(
        ctx=r.s.public, preset=r.s.preset, run=RUN, round=ROUND, layout_digest=LAYOUT.digest,
        numel=NUMEL, key_for=lambda c: pub[c], weighting="client", quant=QUANT,
    )  # fmt: skip
    for u in updates:
        acc.add(u.encode())  # through the wire form, as uploaded
    return acc.result()


def loaded(s: Scheme, chunks: tuple[bytes, ...]) -> list[Any]:
    """The ciphertexts parsed under the secret context, as the key holder parses them."""
    return [
        load_packed(s.secret, s.preset, QUANT, c, n) for c, n in zip(chunks, s.slots, strict=True)
    ]


def decrypt_ints(s: Scheme, chunks: tuple[bytes, ...]) -> list[np.ndarray]:
    """What aggregator + key holder see when they collude: the decrypted slots as
    integers (CKKS: rounded; BFV: mod t, SEAL decodes them centred)."""
    out = []
    for v in loaded(s, chunks):
        if s.plain_modulus is None:
            out.append(np.rint(np.asarray(v.decrypt(), np.float64)).astype(np.int64))
        else:
            out.append(np.asarray(v.decrypt(), np.int64) % s.plain_modulus)
    return out


def residues(s: Scheme, chunks: tuple[bytes, ...]) -> np.ndarray:
    """Decrypted slots reduced mod M, concatenated (int64 in [0, M))."""
    return np.concatenate([np.mod(v, s.modulus) for v in decrypt_ints(s, chunks)])


def key_holder_unpack(s: Scheme, chunks: tuple[bytes, ...], n: int, *, masked: bool) -> Any:
    """The key holder's own decryption and unpacking (with every range check)."""
    return decrypt_packed(loaded(s, chunks), s.preset, QUANT, n, NUMEL, masked=masked)


def lanes_as_one_client(s: Scheme, values: list[np.ndarray]) -> np.ndarray:
    """The attack: read one upload as if it were a sum of one client (split lanes mod M,
    dequantise) without the range checks that would refuse it."""
    out = []
    for vals, m in zip(values, s.chunk_params, strict=True):
        ints = np.mod(vals, s.modulus)
        grid = [(ints >> (j * B)) & ((1 << B) - 1) for j in range(s.lanes)]
        out.append(np.concatenate(grid)[:m].astype(np.float64) * QUANT.step - QUANT.range)
    return np.concatenate(out)


def exact_sum(r: Round, names: tuple[str, ...]) -> np.ndarray:
    """Σ of the clients' quantised levels, dequantised as the unpacking does (bit for bit)."""
    levels = np.zeros(NUMEL, dtype=np.int64)
    for i, c in enumerate(r.names):
        if c not in names:
            continue
        rng, pos = coins(i), 0
        for m in r.s.coin_chunks:
            levels[pos : pos + m] += quantise(r.vectors[c][pos : pos + m], QUANT, rng)
            pos += m
    out = levels.astype(np.float64)
    out *= QUANT.step
    out -= len(names) * QUANT.range
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def lane_bits_look_uniform(s: Scheme, res: np.ndarray) -> bool:
    """The top and bottom bit of every lane are set about half the time."""
    tol = 5 * 0.5 / math.sqrt(res.shape[0])
    for j in range(s.lanes):
        lane = (res >> (j * B)) & ((1 << B) - 1)
        for bit in (0, B - 1):
            if abs(float(((lane >> bit) & 1).mean()) - 0.5) > tol:
                return False
    return True


def test_the_two_schemes_differ_where_it_matters() -> None:
    """The parametrisation is not vacuous: different rings of slots, one M."""
    ckks, bfv = scheme("xfl-packed"), scheme("bfv-lanes")
    assert ckks.preset.scheme == "ckks" and bfv.preset.scheme == "bfv"
    assert bfv.preset.slots == 2 * ckks.preset.slots
    assert len(bfv.chunk_params) < len(ckks.chunk_params)
    assert bfv.plain_modulus is not None
    assert bfv.plain_modulus >= QUANT.max_clients * bfv.modulus  # a masked sum never wraps t


# ------------------------------------------------------------------ masks cancel exactly


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("n", [3, 8])
def test_the_masked_aggregate_unpacks_bit_for_bit_like_the_unmasked_one(name: str, n: int) -> None:
    r = make_round(name, n)
    for c in r.names:
        assert r.masked[c].statement.mask == r.masks[c].claim
        assert r.plain[c].statement.mask is None
        assert r.masked[c].chunks != r.plain[c].chunks
    plain = accumulate(r, [r.plain[c] for c in r.names])
    masked = accumulate(r, [r.masked[c] for c in r.names])
    got_plain = key_holder_unpack(r.s, plain.chunks, n, masked=False)
    got_masked = key_holder_unpack(r.s, masked.chunks, n, masked=True)
    assert np.array_equal(got_masked, got_plain)
    # ... and both are exactly the plaintext sum of the quantised updates.
    assert np.array_equal(got_plain, exact_sum(r, r.names))
    truth = np.sum([r.vectors[c] for c in r.names], axis=0)
    assert float(np.max(np.abs(got_masked - truth))) < n * QUANT.step
    # Read without the reduction mod M, the masked sum is not the sum (the masks are there).
    with pytest.raises(CodecError):
        key_holder_unpack(r.s, masked.chunks, n, masked=False)


# ------------------------------------------------------------------ the collusion


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("n", [3, 8])
def test_colluding_aggregator_and_key_holder_learn_nothing_from_one_masked_upload(
    name: str, n: int
) -> None:
    r = make_round(name, n)
    s = r.s
    victim = r.names[1]
    truth = r.vectors[victim]
    upload = r.masked[victim]
    if s.plain_modulus is not None:
        # BFV carries the masked residue as is: every decrypted slot already lies in [0, M).
        assert all(int(v.max()) < s.modulus for v in decrypt_ints(s, upload.chunks))

    # Its slots, reduced mod M, are uniform mod M ...
    res = residues(s, upload.chunks)
    assert res.shape == (s.total_slots,)
    assert chi2_p(res.astype(np.uint64), s.modulus) > 1e-4
    u = res / s.modulus
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / s.total_slots)
    assert lane_bits_look_uniform(s, res)

    # ... and its lanes, read as one client's update, are unrelated to the update: as
    # close to it as uniform residues read the same way.
    stolen = lanes_as_one_client(s, decrypt_ints(s, upload.chunks))
    assert abs(cosine(stolen, truth)) < COS_LIMIT
    rand = np.random.default_rng(7).integers(0, s.modulus, s.total_slots, dtype=np.int64)
    random_read = lanes_as_one_client(s, np.split(rand, np.cumsum(s.slots)[:-1]))
    assert abs(cosine(random_read, truth)) < COS_LIMIT
    # The distribution of the stolen lanes is that of random residues' lanes.
    assert stats.ks_2samp(stolen, random_read).pvalue > 1e-4
    # The key holder's range checks refuse it as a "sum" of one client.
    with pytest.raises(CodecError):
        key_holder_unpack(s, upload.chunks, 1, masked=True)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("n", [3, 8])
def test_without_masks_the_same_collusion_reads_the_update(name: str, n: int) -> None:
    """The attack works: this is what the masks prevent (the checks above can fail)."""
    r = make_round(name, n)
    s = r.s
    victim = r.names[1]
    truth = r.vectors[victim]
    upload = r.plain[victim]
    stolen = lanes_as_one_client(s, decrypt_ints(s, upload.chunks))
    assert cosine(stolen, truth) > 0.9
    # Exactly the victim's quantised update, through the key holder's own unpacking.
    one = key_holder_unpack(s, upload.chunks, 1, masked=False)
    assert np.array_equal(one, exact_sum(r, (victim,))) and np.array_equal(one, stolen)
    # Its slots are far from uniform: every lane's top bit is clear.
    res = residues(s, upload.chunks)
    assert chi2_p(res.astype(np.uint64), s.modulus) < 1e-4
    assert not lane_bits_look_uniform(s, res)
    assert all(((res >> (j * B + B - 1)) & 1).max() == 0 for j in range(s.lanes))


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("n", [3, 8])
def test_a_partial_masked_sum_decrypts_to_uniform_residues(name: str, n: int) -> None:
    r = make_round(name, n)
    s = r.s
    for dropped in (r.names[0], r.names[-1]):
        rest = tuple(c for c in r.names if c != dropped)
        partial = accumulate(r, [r.masked[c] for c in rest])
        res = residues(s, partial.chunks)
        assert chi2_p(res.astype(np.uint64), s.modulus) > 1e-4
        assert lane_bits_look_uniform(s, res)
        with pytest.raises(CodecError):  # the key holder's unpacking refuses it
            key_holder_unpack(s, partial.chunks, n - 1, masked=True)
        # Read regardless, it says nothing about the partial sum it hides.
        lanes = lanes_as_one_client(s, decrypt_ints(s, partial.chunks))
        assert abs(cosine(lanes, exact_sum(r, rest))) < COS_LIMIT
    # The unmasked partial sum, by contrast, is the partial sum.
    rest = r.names[1:]
    plain = accumulate(r, [r.plain[c] for c in rest])
    got = key_holder_unpack(s, plain.chunks, n - 1, masked=False)
    assert np.array_equal(got, exact_sum(r, rest))


# ------------------------------------------------------------------ the key holder's policy


def key_holder(r: Round, state: Path, *, masking: bool = True) -> KeyHolder:
    return KeyHolder(
        ctx=r.s.secret,
        preset=r.s.preset,
        policy=KeyHolderPolicy(run=RUN, min_clients=2, masking=masking),
        client_keys=r.public_keys,
        state_dir=state,
    )


def refusal(kh: KeyHolder, agg: EncryptedAggregate) -> str:
    with pytest.raises(DecryptionRefused) as info:
        kh.decrypt(agg.encode())
    return info.value.reason


@pytest.mark.parametrize("name", SCHEMES)
def test_the_key_holder_releases_only_the_full_masked_cohort(name: str, tmp_path: Path) -> None:
    r = make_round(name, 3)
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
