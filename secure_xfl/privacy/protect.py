"""Protect an update: clip, (pre-)weight and noise it here, then seal it in crypto.

The one entry point a pipeline needs on the client side. What is noised is
exactly what is signed: the :class:`DPSpec` handed to the sealer is the one
the noise was drawn for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import tenseal as ts

from secure_xfl.crypto.codec import EncryptionPool, TensorLayout, flatten, layout_of
from secure_xfl.crypto.cohort import CohortMask
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import ProtectedUpdate, Weighting
from secure_xfl.crypto.packing import DEFAULT_MAX_CLIENTS, QuantSpec
from secure_xfl.crypto.protect import UNPLANNED, seal_vector
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.privacy.dp import DPConfig, privatize

__all__ = ["NO_DP_WARNING", "protect_update", "protect_vector"]

log = logging.getLogger(__name__)

#: Logged (WARNING) by every update protected with ``dp=None``.
NO_DP_WARNING = "no differential privacy applied"

_PARAMS_DOC = """
    Parameters (all keyword-only):

    ctx
        The CKKS **public** context (``Kit.public_context()``); it cannot decrypt.
    preset
        The :class:`CKKSPreset` of the run (``get_preset(name)``).
    layout
        The :class:`TensorLayout` every client and the aggregator share;
        :func:`protect_update` derives it from ``update`` when omitted.
    run, round, client
        Run id, round number and this client's name: signed, so an update
        cannot be replayed into another run, round or client's slot.
    signing_key
        This client's private key (``Kit.tls.private_key`` of its kit); the
        aggregator and key holder check the signature against its certificate.
    dp
        **Required.** A :class:`DPConfig` or :class:`DPSpec` (clip norm ``C``,
        noise multiplier ``σ``, cohort ``K``, ``δ``): the update is clipped to
        ``C`` and gets ``N(0, σ²C²/K)`` per coordinate, and the spec is signed.
        Pass ``dp=None`` explicitly to apply no differential privacy at all (only
        pre-weighting); that is signed too, logged as a warning, and refused by a
        key holder whose policy asks for noise.
    weight
        FedAvg weight (e.g. sample count). With ``weighting="client"`` it must
        lie in (0, 1] (divide by a public cap) and is applied here, before the
        noise; with ``"aggregator"`` it is signed and applied to the ciphertext.
    weighting
        ``"client"`` (recommended with DP: aggregator-side weights lower the
        effective noise) or ``"aggregator"`` (default).
    rng
        Generator for the noise and stochastic rounding (default: a fresh
        cryptographically seeded one; pass one only for reproducible tests).
    loss
        Optional training loss to sign along (reported, not used).
    quant, max_clients
        Packed presets only: the quantisation, or ``None`` to derive one from
        ``dp`` for at most ``max_clients`` clients.
    pool
        An :class:`EncryptionPool` to encrypt in parallel processes.
    plan_digest, base_round, base_model_digest
        The round plan and base model this update was trained on (planned
        rounds; library use without plans keeps the defaults, ``UNPLANNED``).
    record
        The record-level DP-SGD (:class:`RecordDPSpec`) that produced the
        update, or ``None`` when none was used.
    mask
        Packed presets in a masked round: the verified :class:`CohortMask`
        (``verify_cohort``); the packed slots get this client's pairwise masks
        mod M and the statement signs the cohort. ``None``: unmasked.

    Returns the signed, encrypted :class:`ProtectedUpdate`; ``.encode()`` gives
    the bytes to send to the aggregator.
"""


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
    dp: DPConfig | DPSpec | None,
    weight: float = 1.0,
    weighting: Weighting = "aggregator",
    rng: np.random.Generator | None = None,
    loss: float | None = None,
    quant: QuantSpec | None = None,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    pool: EncryptionPool | None = None,
    plan_digest: bytes = UNPLANNED,
    base_round: int | None = None,
    base_model_digest: bytes = UNPLANNED,
    record: RecordDPSpec | None = None,
    mask: CohortMask | None = None,
) -> ProtectedUpdate:
    """Clip to C, pre-weight (client weighting), add N(0, σ²C²/K), then encrypt and sign.

    ``vec`` is the flat update (``layout.numel`` float values, e.g.
    ``flatten(state_dict, layout)``).
    """
    spec: DPSpec | None
    if dp is None:
        log.warning("%s: run %s round %d client %s (dp=None)", NO_DP_WARNING, run, round, client)
        spec = None
        out = vec * weight if weighting == "client" else vec
    else:
        cfg = dp if isinstance(dp, DPConfig) else DPConfig.from_spec(dp)
        if cfg.noise_multiplier == 0:
            log.warning("%s: run %s round %d client %s (noise_multiplier=0, clipping only)",
                        NO_DP_WARNING, run, round, client)  # fmt: skip
        spec = cfg.spec()
        out = privatize(vec, cfg, weight=weight if weighting == "client" else 1.0, rng=rng)
    return seal_vector(
        np.asarray(out, dtype=np.float64),
        ctx=ctx,
        preset=preset,
        layout=layout,
        run=run,
        round=round,
        client=client,
        signing_key=signing_key,
        dp=spec,
        weight=weight,
        weighting=weighting,
        loss=loss,
        rng=rng,
        quant=quant,
        max_clients=max_clients,
        pool=pool,
        plan_digest=plan_digest,
        base_round=base_round,
        base_model_digest=base_model_digest,
        record=record,
        mask=mask,
    )


if protect_vector.__doc__:  # None under python -OO
    protect_vector.__doc__ += _PARAMS_DOC


def protect_update(
    update: Mapping[str, Any],
    *,
    ctx: ts.Context,
    preset: CKKSPreset,
    run: str,
    round: int,
    client: str,
    signing_key: Any,
    dp: DPConfig | DPSpec | None,
    layout: TensorLayout | None = None,
    weight: float = 1.0,
    weighting: Weighting = "aggregator",
    rng: np.random.Generator | None = None,
    loss: float | None = None,
    quant: QuantSpec | None = None,
    max_clients: int = DEFAULT_MAX_CLIENTS,
    pool: EncryptionPool | None = None,
    plan_digest: bytes = UNPLANNED,
    base_round: int | None = None,
    base_model_digest: bytes = UNPLANNED,
    record: RecordDPSpec | None = None,
    mask: CohortMask | None = None,
) -> ProtectedUpdate:
    """Protect named tensors (a state dict or its delta, e.g. LoRA weights) for one round.

    Flattens ``update`` (a mapping of names to floating-point ``torch.Tensor``)
    in ``layout`` order, then does what :func:`protect_vector` does: clip to C,
    pre-weight, add N(0, σ²C²/K), encrypt under CKKS and sign. The aggregator's
    :class:`Accumulator` must be built with ``layout.digest`` and ``layout.numel``
    of the same layout (``layout_of(update)``).
    """
    layout = layout or layout_of(update)
    return protect_vector(
        flatten(update, layout),
        ctx=ctx,
        preset=preset,
        layout=layout,
        run=run,
        round=round,
        client=client,
        signing_key=signing_key,
        dp=dp,
        weight=weight,
        weighting=weighting,
        rng=rng,
        loss=loss,
        quant=quant,
        max_clients=max_clients,
        pool=pool,
        plan_digest=plan_digest,
        base_round=base_round,
        base_model_digest=base_model_digest,
        record=record,
        mask=mask,
    )


if protect_update.__doc__:  # None under python -OO
    protect_update.__doc__ += _PARAMS_DOC
