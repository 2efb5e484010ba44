"""Client side: encrypt and sign an already-privatised update vector.

Clipping and noise happen one layer up (:mod:`secure_xfl.privacy.protect`); this
module only needs the signed :class:`DPSpec` to size a packed quantiser and to
state what was applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tenseal as ts

from secure_xfl.crypto import pki
from secure_xfl.crypto.codec import (
    EncryptionPool,
    TensorLayout,
    encrypt_vector,
)
from secure_xfl.crypto.cohort import CohortMask
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import (
    ProtectedUpdate,
    SignedStatement,
    UpdateStatement,
    Weighting,
    ciphertext_digest,
)
from secure_xfl.crypto.errors import CodecError
from secure_xfl.crypto.lanes import MASK_WRAP_LOG2_LIMIT, masked_slots, seal_packed
from secure_xfl.crypto.packing import DEFAULT_MAX_CLIENTS, QuantSpec
from secure_xfl.crypto.recordspec import RecordDPSpec

__all__ = ["MASK_WRAP_LOG2_LIMIT", "UNPLANNED", "masked_slots", "seal_vector"]

#: Plan and model digests of updates sealed outside a planned round (library use).
UNPLANNED = bytes(32)

#: Headroom so the sum of this many clients' values still fits the preset's range.
SUM_HEADROOM_CLIENTS = 1024


def seal_vector(
    vec: np.ndarray,
    *,
    ctx: ts.Context,
    preset: CKKSPreset,
    layout: TensorLayout,
    run: str,
    round: int,
    client: str,
    signing_key: Any,
    dp: DPSpec | None,
    weight: float = 1.0,
    weighting: Weighting = "aggregator",
    loss: float | None = None,
    rng: np.random.Generator | None = None,
    quant: QuantSpec | None = None,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    pool: EncryptionPool | None = None,
    plan_digest: bytes = UNPLANNED,
    base_round: int | None = None,
    base_model_digest: bytes = UNPLANNED,
    record: RecordDPSpec | None = None,
    mask: CohortMask | None = None,
) -> ProtectedUpdate:
    """Encrypt and sign a flat, already clipped, (pre-)weighted and noised vector.

    ``dp`` is what the caller applied (``None``: no DP) and is signed as such, as
    is ``record``, the record-level DP-SGD that produced the update (``None``: none);
    with ``weighting="client"`` the caller already multiplied by ``weight``,
    which must lie in (0, 1] so the contribution stays within the clip norm.

    A packed preset (``preset.packed``) needs client weighting and a
    quantisation: ``quant``, or one derived from the signed ``dp`` for at most
    ``max_clients`` clients (:meth:`QuantSpec.for_dp`); the values are then
    stochastically rounded (``rng``) and packed several per slot. ``pool``
    encrypts in parallel worker processes. ``mask``: a packed update of a masked round
    adds this client's pairwise masks for that verified cohort and signs its claim.
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
    if mask is not None and quant is None:
        raise CodecError(f"preset {preset.name!r} is not packed: pairwise masks need lanes")
    if mask is not None and (mask.own_name, mask.run, mask.round) != (client, run, round):
        raise CodecError("the mask was built for another client, run or round")
    if quant is not None:
        if rng is None:
            # Stochastic rounding needs unpredictable coins, not a fixed seed.
            rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence()))
        chunks = seal_packed(ctx, preset, quant, vec, rng, mask=mask, pool=pool)
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
        plan_digest=plan_digest,
        base_round=round if base_round is None else base_round,
        base_model_digest=base_model_digest,
        dp=dp,
        record=record,
        mask=None if mask is None else mask.claim,
    )
    signature = pki.sign(signing_key, statement.signing_bytes())
    return ProtectedUpdate(SignedStatement(statement, signature), tuple(chunks))
