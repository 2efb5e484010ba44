"""Small builders shared by the crypto unit tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import TensorLayout, layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.envelope import ProtectedUpdate, Weighting
from secure_xfl.privacy.protect import protect_vector
from tests.conftest import contexts

RUN = "run-1"


def layout_for(numel: int) -> TensorLayout:
    return layout_of({"w": torch.zeros(numel)})


def make_update(
    key: Any,
    client: str,
    vec: np.ndarray,
    *,
    preset: str = "xfl-default",
    round: int = 0,
    weight: float = 1.0,
    weighting: Weighting = "aggregator",
    run: str = RUN,
    dp: Any = None,
    **kw: Any,
) -> ProtectedUpdate:
    _, public = contexts(preset)
    return protect_vector(
        vec,
        ctx=public,
        preset=get_preset(preset),
        layout=layout_for(vec.shape[0]),
        run=run,
        round=round,
        client=client,
        signing_key=key,
        weight=weight,
        weighting=weighting,
        dp=dp,
        **kw,
    )


def make_accumulator(
    keys: dict[str, Any],
    numel: int,
    *,
    preset: str = "xfl-default",
    round: int = 0,
    weighting: Weighting = "aggregator",
    weight_scale: float = 1.0,
) -> Accumulator:
    _, public = contexts(preset)
    return Accumulator(
        ctx=public,
        preset=get_preset(preset),
        run=RUN,
        round=round,
        layout_digest=layout_for(numel).digest,
        numel=numel,
        key_for=lambda c: keys[c].public_key(),
        weighting=weighting,
        weight_scale=weight_scale,
    )
