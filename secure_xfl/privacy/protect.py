"""Protect an update: clip, (pre-)weight and noise it here, then seal it in crypto.

The one entry point a pipeline needs on the client side. What is noised is
exactly what is signed: the :class:`DPSpec` handed to the sealer is the one
the noise was drawn for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from secure_xfl.crypto.codec import TensorLayout, flatten, layout_of
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import ProtectedUpdate, Weighting
from secure_xfl.crypto.protect import seal_vector
from secure_xfl.privacy.dp import DPConfig, privatize

__all__ = ["protect_update", "protect_vector"]


def protect_vector(
    vec: np.ndarray,
    *,
    dp: DPConfig | DPSpec | None = None,
    weight: float = 1.0,
    weighting: Weighting = "aggregator",
    rng: np.random.Generator | None = None,
    **seal: Any,
) -> ProtectedUpdate:
    """Clip to C, pre-weight (client weighting), add N(0, σ²C²/K), then encrypt and sign.

    ``dp=None`` applies no DP (only client pre-weighting) and signs that fact, which a
    key holder whose policy asks for noise refuses. ``seal`` goes to
    :func:`secure_xfl.crypto.protect.seal_vector` (context, preset, layout, run,
    round, client, signing key, plan and model digests, quantisation, pool).
    """
    spec: DPSpec | None
    if dp is None:
        spec = None
        out = vec * weight if weighting == "client" else vec
    else:
        cfg = dp if isinstance(dp, DPConfig) else DPConfig.from_spec(dp)
        spec = cfg.spec()
        out = privatize(vec, cfg, weight=weight if weighting == "client" else 1.0, rng=rng)
    return seal_vector(
        np.asarray(out, dtype=np.float64),
        dp=spec,
        weight=weight,
        weighting=weighting,
        rng=rng,
        **seal,
    )


def protect_update(
    update: Mapping[str, Any],
    *,
    layout: TensorLayout | None = None,
    **kwargs: Any,
) -> ProtectedUpdate:
    """:func:`protect_vector` for named tensors (e.g. a LoRA state-dict delta)."""
    layout = layout or layout_of(update)
    return protect_vector(flatten(update, layout), layout=layout, **kwargs)
