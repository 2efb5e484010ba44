"""CKKS presets, security table, public/secret context handling."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from secure_xfl.crypto.context import (
    HE_STANDARD_128,
    PRESETS,
    CKKSPreset,
    check_context_matches,
    check_security,
    generate_context,
    get_preset,
    load_context,
    public_context_bytes,
    read_context_file,
    write_secret_context,
)
from secure_xfl.crypto.errors import ContextError, InsecureParameters
from tests.conftest import contexts


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_meets_the_128_bit_table(name: str) -> None:
    p = PRESETS[name]
    assert sum(p.coeff_mod_bit_sizes) <= HE_STANDARD_128[p.poly_modulus_degree]


def test_nvflare_baseline_preset_is_the_documented_one() -> None:
    p = get_preset("nvflare-default")
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits) == (8192, (60, 40, 40), 40)


@pytest.mark.parametrize(
    ("n", "coeff"),
    [(4096, (60, 40, 40)), (8192, (60, 60, 60, 60)), (2048, (30, 30)), (1000, (20, 20))],
)
def test_insecure_custom_parameters_are_refused(n: int, coeff: tuple[int, ...]) -> None:
    with pytest.raises(InsecureParameters):
        check_security(n, coeff)
    with pytest.raises(InsecureParameters):
        CKKSPreset("custom", n, coeff, 30, len(coeff) - 2)


def test_unknown_preset_is_a_typed_error() -> None:
    with pytest.raises(ContextError, match="unknown CKKS preset"):
        get_preset("nope")


def test_public_context_carries_no_secret_key_and_cannot_decrypt() -> None:
    secret, _ = contexts()
    data = public_context_bytes(secret)
    pub = load_context(data, require_secret=False)
    assert not pub.has_secret_key()
    vec = ts.ckks_vector(pub, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        vec.decrypt()
    # The key holder can decrypt what the public context encrypted.
    vec.link_context(secret)
    assert np.allclose(vec.decrypt(), [1.0, 2.0, 3.0], atol=1e-3)


def test_loading_a_secret_context_where_a_public_one_is_expected_is_refused() -> None:
    secret, _ = contexts()
    from secure_xfl.crypto.context import secret_context_bytes

    with pytest.raises(ContextError, match="secret key"):
        load_context(secret_context_bytes(secret), require_secret=False)


@pytest.mark.parametrize("blob", [b"", b"\x00" * 10, b"not a context" * 100])
def test_garbage_context_bytes_are_a_typed_error(blob: bytes) -> None:
    with pytest.raises(ContextError):
        load_context(blob)


def test_secret_context_file_is_mode_0600(tmp_path: Path) -> None:
    secret, _ = contexts()
    path = tmp_path / "secret.ctx"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_secret_context(path, secret)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = read_context_file(path, require_secret=True)
    assert loaded.has_secret_key()


def test_context_matches_its_preset_only() -> None:
    secret, _ = contexts()
    check_context_matches(secret, get_preset("xfl-default"))
    with pytest.raises(ContextError):
        check_context_matches(secret, get_preset("nvflare-default"))


def test_generate_context_uses_preset_scale() -> None:
    ctx = generate_context("xfl-sum")
    assert ctx.global_scale == 2.0**40
