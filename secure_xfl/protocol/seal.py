"""Sealing one planned upload: the step every client shares (the real one, the load
generator's), kept apart from the round logic of :mod:`.client`."""

from __future__ import annotations

from typing import Any

from secure_xfl.crypto.codec import TensorLayout
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.protocol.client import SealAndUpload

__all__ = ["seal_upload"]


def seal_upload(
    act: SealAndUpload,
    vec: Any,
    layout: TensorLayout,
    *,
    ctx: Any,
    preset: CKKSPreset,
    client: str,
    signing_key: Any,
    mask: Any = None,
) -> bytes:
    """Perform ``act`` on the flat update ``vec``: clip, pre-weight and noise it with the
    accepted DP, encrypt and sign it for the action's round and plan (fresh noise on
    every call). Every client — the real one and the load generator's — seals here.
    ``mask``: the verified :class:`~secure_xfl.crypto.cohort.CohortMask` of a masked round."""
    plan = act.plan
    return protect_vector(
        vec,
        dp=act.dp,
        weight=act.weight,
        weighting=plan.weighting,
        ctx=ctx,
        preset=preset,
        layout=layout,
        run=plan.run,
        round=act.round,
        client=client,
        signing_key=signing_key,
        loss=act.loss,
        quant=plan.quant,
        max_clients=plan.quant.max_clients if plan.quant else 8,
        plan_digest=plan.digest,
        base_round=plan.round,
        base_model_digest=plan.model_digest,
        record=act.record,
        mask=mask,
    ).encode()
