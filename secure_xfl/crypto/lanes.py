"""The packed presets behind one interface: CKKS lanes (``xfl-packed``) and BFV lanes
(``bfv-lanes``).

Both quantise with the same :class:`QuantSpec` and pack ``lanes`` values per slot;
they differ in the slots (CKKS: N/2 real slots at scale 2^scale_bits, decoded and
rounded; BFV: N integer slots mod a prime ``t``, exact) and in how many lanes fit
(:meth:`QuantSpec.lanes` from the CKKS precision, :meth:`BFVPreset.layout` from the
BFV noise budget). Sealing, summing and decrypting call here, so the envelope,
aggregator, key holder and services do not care which scheme carries a round.

Pairwise masks (:mod:`.cohort`) are added mod ``M = 2^(lanes·B)`` in both: CKKS
encodes the masked residue centred in [−M/2, M/2) (see
:meth:`QuantSpec.masked_wrap_log2`), BFV as is in [0, M) (a sum of ≤ max_clients
such residues is < t, so BFV never wraps it); the key holder reduces the decrypted
sum mod M, where the masks cancel, before unpacking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal as ts

from secure_xfl.crypto.bfv import (
    BFVLayout,
    check_bfv_context,
    encrypt_bfv,
    generate_bfv_context,
    get_bfv_preset,
    load_bfv,
    pack_bfv,
    unpack_bfv,
)
from secure_xfl.crypto.codec import EncryptionPool, encrypt_slots, load_chunk
from secure_xfl.crypto.cohort import CohortMask, centre
from secure_xfl.crypto.context import CKKSPreset, check_context_matches
from secure_xfl.crypto.errors import CodecError
from secure_xfl.crypto.packing import QuantSpec, pack_int_chunks, unpack_vector

__all__ = [
    "MASK_WRAP_LOG2_LIMIT", "bfv_layout", "check_context", "chunk_slots", "decrypt_packed",
    "fresh_chunk_bytes", "load_packed", "mask_modulus", "masked_slots", "new_context",
    "seal_packed",
]  # fmt: skip

#: A masked CKKS sum is sealed only if one coefficient wraps with probability below
#: 2^this (:meth:`QuantSpec.masked_wrap_log2`).
MASK_WRAP_LOG2_LIMIT = -128.0


def bfv_layout(preset: CKKSPreset, quant: QuantSpec) -> BFVLayout:
    """Lanes and plain modulus of a BFV preset for ``quant``."""
    return get_bfv_preset(preset.name).layout(quant)


def chunk_slots(preset: CKKSPreset, quant: QuantSpec, numel: int) -> list[int]:
    """Slots each ciphertext of a packed update of ``numel`` values uses."""
    if preset.scheme == "bfv":
        return bfv_layout(preset, quant).chunk_slots(numel)
    return quant.chunk_slots(numel, preset.slots)


def mask_modulus(preset: CKKSPreset, quant: QuantSpec) -> int:
    """``M``: pairwise masks and the key holder's reduction are mod this."""
    if preset.scheme == "bfv":
        return bfv_layout(preset, quant).mask_modulus
    return quant.mask_modulus


def new_context(preset: CKKSPreset, quant: QuantSpec | None) -> ts.Context:
    """A fresh secret context (key holder, at provisioning): BFV fixes ``t`` by ``quant``."""
    from secure_xfl.crypto.context import generate_context

    if preset.scheme != "bfv":
        return generate_context(preset)
    if quant is None:
        raise CodecError(f"preset {preset.name!r} derives its plain modulus from DP settings")
    return generate_bfv_context(bfv_layout(preset, quant))


def check_context(ctx: ts.Context, preset: CKKSPreset, quant: QuantSpec | None) -> None:
    """Refuse a context of other parameters than ``preset`` (and, BFV, ``quant``'s t)."""
    if preset.scheme != "bfv":
        check_context_matches(ctx, preset)
        return
    if quant is None:
        raise CodecError(f"preset {preset.name!r} needs the run's quantisation")
    check_bfv_context(ctx, bfv_layout(preset, quant))


def masked_slots(
    vec: np.ndarray, quant: QuantSpec, slots: int, rng: np.random.Generator, mask: CohortMask
) -> list[np.ndarray]:
    """CKKS: packed slot vectors plus this client's pairwise mask mod M, centred, one per
    ciphertext: alone, each slot is uniform to anyone missing one of its pair seeds."""
    modulus = quant.mask_modulus
    chunks = list(pack_int_chunks(vec, quant, slots, rng))
    return [centre(r, modulus) for r in _add_mask(chunks, mask, modulus)]


def _add_mask(chunks: list[np.ndarray], mask: CohortMask, modulus: int) -> list[np.ndarray]:
    total = sum(c.shape[0] for c in chunks)
    stream = mask.mask(total, modulus)  # one stream over every slot of the update
    out, pos = [], 0
    for c in chunks:
        masked = stream[pos : pos + c.shape[0]] + c.astype(np.uint64)  # both < M ≤ 2^62
        np.minimum(masked, masked - np.uint64(modulus), out=masked)
        out.append(masked)
        pos += c.shape[0]
    return out


def seal_packed(
    ctx: ts.Context,
    preset: CKKSPreset,
    quant: QuantSpec,
    vec: np.ndarray,
    rng: np.random.Generator,
    *,
    mask: CohortMask | None = None,
    pool: EncryptionPool | None = None,
) -> list[bytes]:
    """Quantise, pack, mask (when ``mask``) and encrypt a flat, range-checked update."""
    if mask is not None and len(mask.keys) > quant.max_clients:
        raise CodecError(f"a cohort of {len(mask.keys)} exceeds the {quant.max_clients} "
                         "clients the lanes' headroom can sum")  # fmt: skip
    check_context(ctx, preset, quant)
    if preset.scheme == "bfv":
        layout = bfv_layout(preset, quant)
        slots = pack_bfv(vec, layout, rng)
        if mask is not None:
            slots = [r.astype(np.int64) for r in _add_mask(slots, mask, layout.mask_modulus)]
        return encrypt_bfv(ctx, slots, layout)
    if mask is not None:
        wrap = quant.masked_wrap_log2(preset.poly_modulus_degree)
        if wrap > MASK_WRAP_LOG2_LIMIT:
            raise CodecError(f"{quant} leaves a masked sum a 2^{wrap:.0f} chance to wrap")
        packed: Any = iter(masked_slots(vec, quant, preset.slots, rng, mask))
    else:
        # pack_int_chunks range-checks each piece against ±R before quantising it.
        packed = (np.asarray(c, np.float64) for c in pack_int_chunks(vec, quant, preset.slots, rng))
    return encrypt_slots(ctx, packed, scale=2.0**quant.scale_bits, pool=pool)


def load_packed(
    ctx: ts.Context, preset: CKKSPreset, quant: QuantSpec, data: bytes, expected_len: int
) -> Any:
    """Parse one packed ciphertext and check its shape (typed ``EnvelopeError``)."""
    if preset.scheme == "bfv":
        return load_bfv(ctx, data, bfv_layout(preset, quant), expected_len=expected_len)
    return load_chunk(ctx, data, preset, expected_len=expected_len, scale_bits=quant.scale_bits)


def decrypt_packed(
    vectors: Sequence[Any],
    preset: CKKSPreset,
    quant: QuantSpec,
    n_clients: int,
    numel: int,
    *,
    masked: bool,
) -> np.ndarray:
    """Decrypt loaded (secret-context) sums, reduce mod M when masked, unpack: the
    float64 sum. A slot or lane no valid sum can hold is a :class:`CodecError`."""
    if preset.scheme != "bfv":
        values = [np.asarray(v.decrypt(), dtype=np.float64) for v in vectors]
        return unpack_vector(values, quant, n_clients, numel, preset.slots, masked=masked)
    layout = bfv_layout(preset, quant)
    slots = []
    for v in vectors:
        ints = np.asarray(v.decrypt(), np.int64) % layout.plain_modulus  # SEAL decodes centred
        if masked:
            if int(ints.max(initial=0)) >= n_clients * layout.mask_modulus:
                raise CodecError("masked slot outside the range of a sum of masked updates")
            ints %= layout.mask_modulus
        slots.append(ints)
    return unpack_bfv(slots, layout, n_clients, numel)


def fresh_chunk_bytes(ctx: ts.Context, preset: CKKSPreset, quant: QuantSpec | None) -> int:
    """Size of one fresh ciphertext under ``ctx`` (measured: sizes request limits)."""
    check_context(ctx, preset, quant)
    if preset.scheme == "bfv" and quant is not None:
        layout = bfv_layout(preset, quant)
        zeros = np.zeros(preset.poly_modulus_degree, np.int64)
        return len(encrypt_bfv(ctx, [zeros], layout)[0])
    scale = None if quant is None else 2.0**quant.scale_bits
    return len(encrypt_slots(ctx, [np.zeros(preset.slots)], scale=scale)[0])
