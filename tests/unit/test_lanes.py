"""The packed-scheme interface (``crypto/lanes.py``) on real TenSEAL, both schemes.

``xfl-packed`` (CKKS lanes) and ``bfv-lanes`` (BFV lanes, t fixed by the run's
quantisation) sit behind one set of calls; these tests pin what each call answers
per scheme, that every mismatch (scheme, t, cohort size, ciphertext kind) is a typed
refusal, the wire size, and that a provisioned bfv-lanes federation's kits hold
contexts of exactly the quantisation their config derives.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from secure_xfl.config import (
    FederationSettings,
    KitConfig,
    PrivacySettings,
    RecordPrivacySettings,
)
from secure_xfl.crypto.codec import TensorLayout, layout_of
from secure_xfl.crypto.cohort import CohortMask
from secure_xfl.crypto.context import PRESETS, get_preset, load_context, public_context_bytes
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.errors import CodecError, ContextError, EnvelopeError
from secure_xfl.crypto.lanes import (
    bfv_layout,
    check_context,
    chunk_slots,
    decrypt_packed,
    fresh_chunk_bytes,
    load_packed,
    mask_modulus,
    new_context,
    seal_packed,
)
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.protect import seal_vector
from secure_xfl.errors import ConfigError
from secure_xfl.kit import Kit, provision
from tests.unit.test_masking import fixed_pair

pytestmark = pytest.mark.timeout(120)

DP = DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=2)
QUANT = QuantSpec.for_dp(DP, max_clients=8)
#: Another quantisation: fewer clients' headroom, hence another BFV plain modulus.
QUANT3 = QuantSpec.for_dp(DP, max_clients=3)
BFV, CKKS = get_preset("bfv-lanes"), get_preset("xfl-packed")
SCHEMES = ("xfl-packed", "bfv-lanes")
CKKS_PRESETS = sorted(n for n, p in PRESETS.items() if p.scheme == "ckks")
RUN, ROUND = "run-l", 1
NUMEL = 20_000


@functools.cache
def contexts(name: str, quant: QuantSpec = QUANT) -> tuple[ts.Context, ts.Context]:
    """(secret, public) as provisioning makes them."""
    secret = new_context(get_preset(name), quant)
    return secret, load_context(public_context_bytes(secret), require_secret=False)


def update(numel: int = NUMEL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.5, numel)


def cohort(n: int, label: str) -> dict[str, CohortMask]:
    """Each member's CohortMask for a cohort of ``n`` signed X25519 keys."""
    names = [f"m{i}" for i in range(n)]
    pairs = {c: fixed_pair(f"lanes/{label}/{c}") for c in names}
    sks = {c: ed25519.Ed25519PrivateKey.generate() for c in names}
    keys = tuple(
        pairs[c].sign(run=RUN, round=ROUND, attempt=0, client=c, signing_key=sks[c]) for c in names
    )
    return {c: CohortMask(RUN, ROUND, 0, c, pairs[c], keys) for c in names}


def rng(seed: int = 1) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ slots and M per scheme


@pytest.mark.parametrize("numel", [1, 2048 * 3, 4096 * 3, 4096 * 3 + 1, NUMEL, 100_000])
def test_chunk_slots_follow_each_schemes_slot_count(numel: int) -> None:
    layout = bfv_layout(BFV, QUANT)
    bfv, ckks = chunk_slots(BFV, QUANT, numel), chunk_slots(CKKS, QUANT, numel)
    assert bfv == layout.chunk_slots(numel)
    assert ckks == QUANT.chunk_slots(numel, CKKS.slots)
    for slots, cap, lanes in ((bfv, BFV.slots, layout.lanes), (ckks, CKKS.slots, QUANT.lanes)):
        assert all(0 < s <= cap for s in slots) and all(s == cap for s in slots[:-1])
        assert len(slots) == math.ceil(numel / (cap * lanes))  # as few ciphertexts as fit
        assert (sum(slots) - 1) * lanes < numel <= sum(slots) * lanes
    # BFV's N integer slots are twice CKKS's N/2 real ones (the lanes per slot agree here).
    assert BFV.slots == 4096 == 2 * CKKS.slots and layout.lanes == QUANT.lanes == 3


def test_chunk_slots_of_20000_params() -> None:
    assert chunk_slots(BFV, QUANT, NUMEL) == [4096, 2571]
    assert chunk_slots(CKKS, QUANT, NUMEL) == [2048, 2048, 2048, 523]


@pytest.mark.parametrize("quant", [QUANT, QUANT3], ids=["8-clients", "3-clients"])
def test_mask_modulus_per_scheme(quant: QuantSpec) -> None:
    layout = bfv_layout(BFV, quant)
    assert mask_modulus(CKKS, quant) == quant.mask_modulus == 1 << (quant.lanes * quant.lane_bits)
    assert mask_modulus(BFV, quant) == layout.mask_modulus
    assert layout.mask_modulus == 1 << (layout.lanes * quant.lane_bits)
    # BFV: a masked sum of max_clients residues in [0, M) stays below t (never wraps).
    assert quant.max_clients * layout.mask_modulus <= layout.plain_modulus


# ------------------------------------------------------------------ contexts


def test_new_context_refuses_a_bfv_preset_without_quantisation() -> None:
    with pytest.raises(CodecError):
        new_context(BFV, None)
    with pytest.raises(CodecError):
        check_context(contexts("bfv-lanes")[1], BFV, None)


@pytest.mark.parametrize("name", SCHEMES)
def test_check_context_accepts_the_matching_secret_and_public_context(name: str) -> None:
    secret, public = contexts(name)
    for ctx in (secret, public):
        check_context(ctx, get_preset(name), QUANT)
    assert secret.has_secret_key() and not public.has_secret_key()


def test_check_context_refuses_a_bfv_context_of_another_quantisation() -> None:
    t8 = bfv_layout(BFV, QUANT).plain_modulus
    t3 = bfv_layout(BFV, QUANT3).plain_modulus
    assert t8 != t3
    secret3, public3 = contexts("bfv-lanes", QUANT3)
    check_context(public3, BFV, QUANT3)  # its own quantisation: fine
    for ctx in (secret3, public3):
        with pytest.raises(ContextError, match=str(t8)):
            check_context(ctx, BFV, QUANT)
    for ctx in contexts("bfv-lanes"):
        with pytest.raises(ContextError):
            check_context(ctx, BFV, QUANT3)


def test_check_context_refuses_a_ckks_context_under_the_bfv_preset() -> None:
    for ctx in contexts("xfl-packed"):
        with pytest.raises(ContextError):
            check_context(ctx, BFV, QUANT)


def test_check_context_refuses_a_bfv_context_under_the_ckks_preset() -> None:
    for ctx in contexts("bfv-lanes"):
        with pytest.raises(ContextError):
            check_context(ctx, CKKS, QUANT)


# ------------------------------------------------------------------ sealing and loading


@pytest.mark.parametrize("name", SCHEMES)
def test_seal_packed_refuses_a_cohort_larger_than_max_clients(name: str) -> None:
    preset, (_, public) = get_preset(name), contexts(name)
    vec = update(1000)
    too_many = cohort(QUANT.max_clients + 1, f"big/{name}")
    with pytest.raises(CodecError, match="cohort of 9"):
        seal_packed(public, preset, QUANT, vec, rng(), mask=too_many["m0"])
    # A cohort of exactly max_clients seals (so the refusal above is the cohort size).
    full = cohort(QUANT.max_clients, f"full/{name}")
    out = seal_packed(public, preset, QUANT, vec, rng(), mask=full["m0"])
    assert len(out) == len(chunk_slots(preset, QUANT, 1000))


@pytest.mark.parametrize(("sealed", "loader"), [SCHEMES, SCHEMES[::-1]])
def test_load_packed_refuses_the_other_schemes_ciphertext(sealed: str, loader: str) -> None:
    p_seal, p_load = get_preset(sealed), get_preset(loader)
    chunk = seal_packed(contexts(sealed)[1], p_seal, QUANT, update(), rng())[0]
    n_own = chunk_slots(p_seal, QUANT, NUMEL)[0]
    n_other = chunk_slots(p_load, QUANT, NUMEL)[0]
    for ctx in contexts(loader):
        for n in {n_own, n_other}:
            with pytest.raises(EnvelopeError):
                load_packed(ctx, p_load, QUANT, chunk, n)
    # Under its own scheme the same bytes load (the refusal is the scheme).
    assert load_packed(contexts(sealed)[0], p_seal, QUANT, chunk, n_own).size() == n_own


def test_load_packed_refuses_a_bfv_ciphertext_of_another_plain_modulus() -> None:
    chunk = seal_packed(contexts("bfv-lanes", QUANT3)[1], BFV, QUANT3, update(), rng())[0]
    with pytest.raises(EnvelopeError):
        load_packed(contexts("bfv-lanes")[0], BFV, QUANT, chunk, 4096)


# ------------------------------------------------------------------ decrypting masked lanes


def sealed_cohort(n: int, *, masked: bool) -> list[list[bytes]]:
    _, public = contexts("bfv-lanes")
    masks = cohort(n, f"dec/{n}")
    return [
        seal_packed(public, BFV, QUANT, update(seed=i), rng(10 + i),
                    mask=masks[c] if masked else None)
        for i, c in enumerate(masks)
    ]  # fmt: skip


def loaded_sum(uploads: list[list[bytes]]) -> list[ts.BFVVector]:
    secret, _ = contexts("bfv-lanes")
    lengths = chunk_slots(BFV, QUANT, NUMEL)
    total = [
        load_packed(secret, BFV, QUANT, c, n) for c, n in zip(uploads[0], lengths, strict=True)
    ]
    for up in uploads[1:]:
        for acc, (c, n) in zip(total, zip(up, lengths, strict=True), strict=True):
            acc.add_(load_packed(secret, BFV, QUANT, c, n))
    return total


def test_decrypt_packed_of_one_masked_bfv_upload_refuses_to_unpack() -> None:
    masked, plain = sealed_cohort(3, masked=True), sealed_cohort(3, masked=False)
    # One upload's slots are masked residues in [0, M): no valid one-client sum.
    with pytest.raises(CodecError, match=r"lane|slot"):
        decrypt_packed(loaded_sum(masked[:1]), BFV, QUANT, 1, NUMEL, masked=True)
    # Nor two of three (a partial cohort).
    with pytest.raises(CodecError, match=r"lane|slot"):
        decrypt_packed(loaded_sum(masked[:2]), BFV, QUANT, 2, NUMEL, masked=True)
    # The whole cohort's sum, read as one client, is above n·M: refused before mod M.
    with pytest.raises(CodecError, match="masked slot"):
        decrypt_packed(loaded_sum(masked), BFV, QUANT, 1, NUMEL, masked=True)
    # Controls: the whole masked cohort decrypts to exactly the unmasked sum, and one
    # unmasked upload decrypts to that client's quantised update.
    got = decrypt_packed(loaded_sum(masked), BFV, QUANT, 3, NUMEL, masked=True)
    want = decrypt_packed(loaded_sum(plain), BFV, QUANT, 3, NUMEL, masked=False)
    assert np.array_equal(got, want)
    truth = sum(update(seed=i) for i in range(3))
    assert float(np.max(np.abs(got - truth))) < 3 * QUANT.step
    one = decrypt_packed(loaded_sum(plain[:1]), BFV, QUANT, 1, NUMEL, masked=False)
    assert float(np.max(np.abs(one - update(seed=0)))) < QUANT.step


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("name", SCHEMES)
def test_fresh_chunk_bytes_is_a_real_chunks_size(name: str) -> None:
    preset, (secret, public) = get_preset(name), contexts(name)
    real = seal_packed(public, preset, QUANT, update(), rng())
    for ctx in (secret, public):
        est = fresh_chunk_bytes(ctx, preset, QUANT)
        assert all(abs(est - len(c)) <= 0.05 * len(c) for c in real)


def upload_bytes_per_param(name: str, numel: int) -> float:
    """The whole signed upload as sent (statement, signature, ciphertexts) per parameter."""
    preset, (_, public) = get_preset(name), contexts(name)
    up = seal_vector(
        update(numel), ctx=public, preset=preset, layout=layout_of_numel(numel), run=RUN,
        round=ROUND, client="a", signing_key=ed25519.Ed25519PrivateKey.generate(), dp=DP,
        weighting="client", rng=rng(), quant=QUANT,
    )  # fmt: skip
    return len(up.encode()) / numel


def layout_of_numel(numel: int) -> TensorLayout:
    return layout_of({"w": torch.zeros(numel)})


@pytest.mark.parametrize(("name", "limit"), [("bfv-lanes", 5.5), ("xfl-packed", 10.8)])
def test_wire_bytes_per_parameter(name: str, limit: float) -> None:
    preset = get_preset(name)
    lanes = bfv_layout(BFV, QUANT).lanes if preset.scheme == "bfv" else QUANT.lanes
    per_ct = preset.slots * lanes
    # About 100k parameters filling their ciphertexts: the preset's rate.
    full = math.ceil(100_000 / per_ct) * per_ct
    assert upload_bytes_per_param(name, full) <= limit
    # Exactly 100k: the last, mostly empty ciphertext is full-sized, and nothing else
    # (statement and signature) costs more than 1 % on top of the ciphertexts.
    n_ct = math.ceil(100_000 / per_ct)
    ct_only = n_ct * fresh_chunk_bytes(contexts(name)[1], preset, QUANT) / 100_000
    got = upload_bytes_per_param(name, 100_000)
    assert ct_only <= got <= 1.01 * ct_only
    # So per parameter the ciphertexts could carry, 100k costs the same rate.
    assert got * 100_000 / (n_ct * per_ct) <= limit


# ------------------------------------------------------------------ configuration and kits


def bfv_config(noise: float = 1.0, max_clients: int = 8, clip: float = 1.0) -> KitConfig:
    return KitConfig(
        federation=FederationSettings(preset="bfv-lanes", max_clients=max_clients),
        privacy=PrivacySettings(
            noise_multiplier=noise, clip_norm=clip, record=RecordPrivacySettings(enabled=False)
        ),
    )


@pytest.mark.parametrize("name", CKKS_PRESETS)
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_lane_quant_is_none_for_ckks_presets(name: str, noise: float) -> None:
    cfg = KitConfig(
        federation=FederationSettings(preset=name),
        privacy=PrivacySettings(noise_multiplier=noise),
    )
    assert cfg.lane_quant() is None


def test_lane_quant_refuses_bfv_without_client_level_noise() -> None:
    with pytest.raises(ConfigError):
        bfv_config(noise=0.0).lane_quant()


@pytest.mark.parametrize(("noise", "max_clients", "clip"), [(1.0, 8, 1.0), (0.7, 3, 20.0)])
def test_lane_quant_is_the_dp_quantisation(noise: float, max_clients: int, clip: float) -> None:
    cfg = bfv_config(noise, max_clients, clip)
    got = cfg.lane_quant()
    assert got == QuantSpec.for_dp(cfg.dp_spec(), max_clients=cfg.federation.max_clients)
    assert got is not None and got.max_clients == max_clients
    bfv_layout(BFV, got)  # fits the preset's noise budget


def test_provisioned_bfv_kits_hold_contexts_of_their_quantisation(tmp_path: Path) -> None:
    cfg = bfv_config()
    kits = provision(tmp_path / "fed", federation="f", clients=["a", "b"], cfg=cfg)
    assert set(kits) == {"keyholder", "aggregator", "client-a", "client-b"}
    quant = cfg.lane_quant()
    assert quant is not None
    publics = []
    for role, path in kits.items():
        kit = Kit.load(path)
        assert kit.config.lane_quant() == quant  # every kit derives the same t
        if role == "keyholder":
            secret = kit.secret_context()
            assert secret.has_secret_key()
            check_context(secret, BFV, quant)
            with pytest.raises(ContextError):
                check_context(secret, BFV, QUANT3)  # a t of other settings is refused
            continue
        public = kit.public_context()
        assert not public.has_secret_key() and public.is_public()
        check_context(public, BFV, quant)
        publics.append(public)
    # What a client seals under its kit's public context, the key holder's secret opens.
    secret = Kit.load(kits["keyholder"]).secret_context()
    vec = update(1000)
    up = seal_packed(publics[-1], BFV, quant, vec, rng())
    vecs = [load_packed(secret, BFV, quant, c, n)
            for c, n in zip(up, chunk_slots(BFV, quant, 1000), strict=True)]  # fmt: skip
    got = decrypt_packed(vecs, BFV, quant, 1, 1000, masked=False)
    assert float(np.max(np.abs(got - vec))) < quant.step
