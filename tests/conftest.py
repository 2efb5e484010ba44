"""Shared fixtures: CKKS contexts are slow to make, so one per preset per session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto.context import (
    generate_context,
    get_preset,
    load_context,
    public_context_bytes,
)

_cache: dict[str, tuple[ts.Context, ts.Context]] = {}


def contexts(preset: str = "xfl-default") -> tuple[ts.Context, ts.Context]:
    """(secret context, public context loaded from its serialised form)."""
    if preset not in _cache:
        secret = generate_context(get_preset(preset))
        public = load_context(public_context_bytes(secret), require_secret=False)
        _cache[preset] = (secret, public)
    return _cache[preset]


@pytest.fixture
def ckks() -> Callable[[str], tuple[ts.Context, ts.Context]]:
    return contexts


@pytest.fixture
def client_keys() -> Callable[[int], dict[str, Any]]:
    def make(n: int) -> dict[str, Any]:
        return {f"client{i}": ec.generate_private_key(ec.SECP256R1()) for i in range(n)}

    return make
