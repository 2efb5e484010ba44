"""Client side: turn a model update into a signed, encrypted, DP-protected envelope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import tenseal as ts
import torch

from secure_xfl.crypto import pki
from secure_xfl.crypto.codec import (
    EncryptionPool,
    TensorLayout,
    encrypt_slots,
    encrypt_vector,
    flatten,
    layout_of,
)
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.envelope import (
    ProtectedUpdate,
    SignedStatement,
    UpdateStatement,
    Weighting,
    ciphertext_digest,
)
from secure_xfl.crypto.errors import CodecError
from secure_xfl.crypto.packing import DEFAULT_MAX_CLIENTS, QuantSpec, pack_chunks

if TYPE_CHECKING:
    from secure_xfl.privacy.dp import DPConfig

#: Headroom so the sum of this many clients' values still fits the preset's range.
SUM_HEADROOM_CLIENTS = 1024


def protect_vector(
    vec: np.ndarray,
    *,
    ctx: ts.Context,
    preset: CKKSPreset,
    layout: TensorLayout,
    run: str,
    round: int,
    client: str,
    signing_key: Any,
    weight: float = 1.0,
    weighting: Weighting = "aggregator",
    loss: float | None = None,
    dp: DPConfig | None = None,
    rng: np.random.Generator | None = None,
    quant: QuantSpec | None = None,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    pool: EncryptionPool | None = None,
) -> ProtectedUpdate:
    """Clip, noise, (pre-)weight, encrypt and sign a flat update vector.

    With ``weighting="client"`` the client multiplies its clipped update by
    ``weight`` (which must lie in (0, 1] so its contribution stays bounded by
    the clip norm) before noise is added; the aggregator then only adds.

    A packed preset (``preset.packed``) needs client weighting and a
    quantisation: ``quant``, or one derived from ``dp`` for at most
    ``max_clients`` clients (:meth:`QuantSpec.for_dp`); the values are then
    stochastically rounded and packed several per slot. ``pool`` encrypts in
    parallel worker processes.
    """
    if vec.shape != (layout.numel,):
        raise CodecError(f"vector has shape {vec.shape}, layout expects ({layout.numel},)")
    if not weight > 0:
        raise CodecError("weight must be > 0")
    if weighting == "client" and weight > 1.0:
        raise CodecError("a client-applied weight must lie in (0, 1]; scale it by a public cap")
    if preset.packed:
        if weighting != "client":
            raise CodecError(f"preset {preset.name!r} sums only: use client weighting")
        if quant is None:
            if dp is None:
                raise CodecError(f"preset {preset.name!r} needs DP settings or a QuantSpec")
            quant = QuantSpec.for_dp(dp, max_clients=max_clients)
    elif quant is not None:
        raise CodecError(f"preset {preset.name!r} is not packed; quant must be None")
    if dp is not None:
        from secure_xfl.privacy.dp import privatize

        pre = weight if weighting == "client" else 1.0
        vec = privatize(vec, dp, weight=pre, rng=rng)
    elif weighting == "client":
        vec = vec * weight
    if quant is not None:
        if rng is None:
            from secure_xfl.privacy.dp import secure_rng

            rng = secure_rng()
        # pack_chunks range-checks each piece against ±R before quantising it.
        packed = pack_chunks(vec, quant, preset.slots, rng)
        chunks = encrypt_slots(ctx, packed, scale=2.0**quant.scale_bits, pool=pool)
    else:
        limit = preset.max_abs_value / SUM_HEADROOM_CLIENTS
        peak = float(np.max(np.abs(vec)))
        if not np.isfinite(peak):
            raise CodecError("update contains NaN or Inf")
        if peak > limit:
            raise CodecError(
                f"update value {peak:.3g} exceeds {limit:.3g}, the range preset "
                f"{preset.name!r} can sum over {SUM_HEADROOM_CLIENTS} clients; "
                "clip or rescale the update"
            )
        chunks = encrypt_vector(ctx, vec, preset, pool=pool)
    statement = UpdateStatement(
        run=run,
        round=round,
        client=client,
        layout_digest=layout.digest,
        preset=preset.name,
        numel=layout.numel,
        weight=float(weight),
        weighting=weighting,
        ciphertext_digest=ciphertext_digest(chunks),
        loss=loss,
        quant=quant,
    )
    signature = pki.sign(signing_key, statement.signing_bytes())
    return ProtectedUpdate(SignedStatement(statement, signature), tuple(chunks))


def protect_update(
    update: Mapping[str, torch.Tensor],
    *,
    layout: TensorLayout | None = None,
    **kwargs: Any,
) -> ProtectedUpdate:
    """:func:`protect_vector` for a mapping of named tensors (e.g. a LoRA state-dict delta)."""
    layout = layout or layout_of(update)
    return protect_vector(flatten(update, layout), layout=layout, **kwargs)
