"""BFV lane packing with real TenSEAL: exact sums, error bound, 128-bit check, refusals."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tenseal as ts
from sympy import isprime

from secure_xfl.crypto.bfv import (
    BFV_PRESETS,
    BFVLayout,
    BFVPreset,
    BFVSum,
    check_bfv_context,
    decrypt_bfv_slots,
    decrypt_unpack_bfv,
    encrypt_bfv,
    generate_bfv_context,
    get_bfv_preset,
    load_bfv,
    pack_bfv,
    plain_modulus_above,
    sum_bfv,
    unpack_bfv,
)
from secure_xfl.crypto.context import HE_STANDARD_128, load_context, public_context_bytes
from secure_xfl.crypto.errors import CodecError, ContextError, EnvelopeError, InsecureParameters
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.privacy.dp import DPConfig

DP = DPConfig(clip_norm=1.0, noise_multiplier=1.0, min_clients=3)
QUANT = QuantSpec.for_dp(DP, max_clients=8)
#: Two full ciphertexts and a partial one (3 lanes × 4096 slots each).
NUMEL = 2 * 3 * 4096 + 1001


@functools.cache
def _setup(preset: str = "bfv-lanes") -> tuple[BFVLayout, ts.Context, ts.Context]:
    layout = get_bfv_preset(preset).layout(QUANT)
    secret = generate_bfv_context(layout, n_threads=1)
    public = load_context(public_context_bytes(secret), require_secret=False)
    return layout, secret, public


def _updates(n: int, numel: int = NUMEL) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [np.clip(rng.normal(scale=0.5, size=numel), -QUANT.range, QUANT.range) for _ in range(n)]


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", sorted(BFV_PRESETS))
def test_presets_meet_the_128_bit_table(name: str) -> None:
    p = BFV_PRESETS[name]
    assert sum(p.coeff_mod_bit_sizes) <= HE_STANDARD_128[p.poly_modulus_degree]
    layout = p.layout(QUANT)
    t = layout.plain_modulus
    assert isprime(t) and t % (2 * p.poly_modulus_degree) == 1
    assert t >= QUANT.max_clients * layout.mask_modulus  # masks mod t or mod M compose
    assert t.bit_length() <= p.max_plain_bits(QUANT.max_clients) <= 60


@pytest.mark.parametrize(
    ("n", "coeffs"),
    [
        (4096, (60, 60)),
        (8192, (60, 60, 60, 40)),
        (2048, (30, 20)),
        (16384, (60, 49)),
        (4096, (60, 20)),
    ],
)
def test_insecure_or_unsupported_presets_are_refused(n: int, coeffs: tuple[int, ...]) -> None:
    with pytest.raises(InsecureParameters):
        BFVPreset(name="weak", poly_modulus_degree=n, coeff_mod_bit_sizes=coeffs)


def test_default_layout_matches_the_prototype() -> None:
    layout = get_bfv_preset("bfv-lanes").layout(QUANT)
    assert (QUANT.bits, layout.lane_bits, layout.lanes) == (10, 13, 3)
    assert layout.params_per_ciphertext == 3 * 4096
    with pytest.raises(ContextError):
        get_bfv_preset("bfv-nope")


def test_plain_modulus_is_the_smallest_batching_prime() -> None:
    t = plain_modulus_above(42, 4096)
    assert t > 2**42 and isprime(t) and t % 8192 == 1
    assert not any(isprime(c) for c in range(t - 8192, 2**42, -8192))


def test_layout_refuses_a_wrong_plain_modulus_and_wide_lanes() -> None:
    p = get_bfv_preset("bfv-lanes")
    for bad in (65537, 2**43 + 1, plain_modulus_above(57, 4096)):  # small, composite, too noisy
        with pytest.raises(CodecError):
            BFVLayout(p, QUANT, 3, bad)
    with pytest.raises(CodecError, match="noise budget"):
        p.layout(QuantSpec(bits=24, max_clients=1024, range=1.0))


# ---------------------------------------------------------------------------- exact sums


@pytest.mark.parametrize(
    ("preset", "n"), [("bfv-lanes", 3), ("bfv-lanes", 8), ("bfv-lanes-8192", 3)]
)
def test_sum_is_the_exact_integer_sum(preset: str, n: int) -> None:
    layout, secret, public = _setup(preset)
    xs = _updates(n)
    packed = [pack_bfv(x, layout, np.random.default_rng(10 + i)) for i, x in enumerate(xs)]
    uploads = [encrypt_bfv(public, p, layout) for p in packed]
    agg = sum_bfv(public, layout, NUMEL, uploads)

    got = decrypt_bfv_slots(secret, agg, layout, NUMEL)
    want = [sum(p[k] for p in packed) for k in range(len(packed[0]))]
    assert len(got) == len(want) == len(layout.chunk_params(NUMEL))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int64 and np.array_equal(g, w)  # bit for bit

    out = decrypt_unpack_bfv(secret, agg, layout, n, NUMEL)
    assert np.array_equal(out, unpack_bfv(want, layout, n, NUMEL))
    err = out - np.sum(xs, axis=0)
    assert float(np.max(np.abs(err))) <= n * QUANT.step  # each rounding moves < one step
    assert float(np.sqrt(np.mean(err**2))) <= QUANT.error_std_bound(n)
    assert abs(float(np.mean(err))) < 0.05 * QUANT.error_std_bound(n)  # unbiased


def test_masks_compose_mod_t_and_mod_m() -> None:
    """Uniform masks cancel whether reduced mod t (native) or mod M inside t."""
    layout, secret, public = _setup()
    t, m = layout.plain_modulus, layout.mask_modulus
    xs = _updates(3)
    packed = [pack_bfv(x, layout, np.random.default_rng(i))[0] for i, x in enumerate(xs)]
    true = sum(packed)
    rng = np.random.default_rng(99)
    for mod in (t, m):
        r = [rng.integers(0, mod, size=true.shape[0], dtype=np.int64) for _ in range(2)]
        masks = [r[0], (r[1] - r[0]) % mod, (-r[1]) % mod]  # Σ ≡ 0 mod `mod`
        ups = [
            encrypt_bfv(public, [(p + k) % mod], layout) for p, k in zip(packed, masks, strict=True)
        ]
        acc = BFVSum(public, layout, layout.params_per_ciphertext)
        for u in ups:
            acc.add(u)
        got = decrypt_bfv_slots(secret, acc.result(), layout, layout.params_per_ciphertext)[0]
        assert np.array_equal(got % mod, true)
        alone = decrypt_bfv_slots(secret, ups[0], layout, layout.params_per_ciphertext)[0]
        with pytest.raises(CodecError):  # one masked upload is no valid sum
            unpack_bfv([alone], layout, 1, layout.params_per_ciphertext)


def test_noise_budget_is_what_decryption_needs() -> None:
    """Sums of max_clients decrypt at the budget's largest t, not ~7 bits beyond it."""
    p, n, rng = get_bfv_preset("bfv-lanes"), 8, np.random.default_rng(5)
    for bits, exact in ((p.max_plain_bits(n) - 1, True), (p.max_plain_bits(n) + 6, False)):
        t = plain_modulus_above(bits, 4096)
        ctx = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=4096,
            plain_modulus=t,
            coeff_mod_bit_sizes=[60, 49],
        )
        vs = [rng.integers(0, t, size=4096) for _ in range(n)]
        acc = ts.bfv_vector(ctx, vs[0].tolist())
        for v in vs[1:]:
            acc.add_(ts.bfv_vector(ctx, v.tolist()))
        assert np.array_equal(np.asarray(acc.decrypt()) % t, sum(vs) % t) is exact


def test_sum_refuses_more_than_max_clients() -> None:
    layout, _, public = _setup()
    up = encrypt_bfv(public, pack_bfv(_updates(1, 100)[0], layout), layout)
    acc = BFVSum(public, layout, 100)
    for _ in range(QUANT.max_clients):
        acc.add(up)
    with pytest.raises(CodecError, match="max_clients"):
        acc.add(up)
    with pytest.raises(CodecError):
        unpack_bfv(decrypt_bfv_slots(_setup()[1], acc.result(), layout, 100), layout, 9, 100)


# ---------------------------------------------------------------------------- refusals


def test_values_outside_the_range_or_the_plain_modulus_are_refused() -> None:
    layout, _, public = _setup()
    with pytest.raises(CodecError, match="range"):
        pack_bfv(np.array([0.0, QUANT.range * 1.01]), layout)
    with pytest.raises(CodecError, match="NaN"):
        pack_bfv(np.array([np.nan]), layout)
    for bad in ([-1], [layout.plain_modulus]):
        with pytest.raises(CodecError, match=r"\[0, t\)"):
            encrypt_bfv(public, [np.array(bad, dtype=np.int64)], layout)
    with pytest.raises(CodecError):
        encrypt_bfv(public, [np.array([1.0])], layout)
    with pytest.raises(CodecError):
        encrypt_bfv(public, [np.zeros(4097, dtype=np.int64)], layout)


def test_foreign_truncated_and_malformed_ciphertexts_are_typed_errors() -> None:
    layout, _, public = _setup()
    good = encrypt_bfv(public, pack_bfv(_updates(1, 300)[0], layout), layout)
    other_t = ts.context(
        ts.SCHEME_TYPE.BFV,
        poly_modulus_degree=4096,
        plain_modulus=1032193,
        coeff_mod_bit_sizes=[60, 49],
    )
    ckks = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 49])
    ckks.global_scale = 2.0**20
    bad = {
        "other t": bytes(ts.bfv_vector(other_t, [1] * 100).serialize()),
        "ckks": bytes(ts.ckks_vector(ckks, [1.0] * 100).serialize()),
        "truncated": good[0][: len(good[0]) // 2],
        "one byte short": good[0][:-1],
        "empty": b"",
        "oversized": good[0] + bytes(8192),
        "garbage": bytes(range(256)) * 4,
    }
    for name, blob in bad.items():
        with pytest.raises(EnvelopeError):
            load_bfv(public, blob, layout, expected_len=100)
            pytest.fail(name)
        with pytest.raises(EnvelopeError):
            BFVSum(public, layout, 300).add([blob])
    with pytest.raises(EnvelopeError, match="slots"):  # a ciphertext of another length
        load_bfv(public, good[0], layout, expected_len=99)
    with pytest.raises(EnvelopeError):
        BFVSum(public, layout, 300).add(good + good)
    with pytest.raises(ContextError):  # the public context cannot decrypt
        decrypt_bfv_slots(public, good, layout, 300)


def test_ciphertext_under_another_key_fails_unpacking() -> None:
    layout, secret, _ = _setup()
    stranger = generate_bfv_context(layout, n_threads=1)
    up = encrypt_bfv(stranger, pack_bfv(_updates(1, 5000)[0], layout), layout)
    with pytest.raises(CodecError, match=r"range|carry"):
        decrypt_unpack_bfv(secret, up, layout, 3, 5000)


def test_context_check() -> None:
    layout, secret, public = _setup()
    check_bfv_context(secret, layout)
    check_bfv_context(public, layout)
    with pytest.raises(ContextError):
        check_bfv_context(_setup("bfv-lanes-8192")[2], layout)
    ckks = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 49])
    with pytest.raises(ContextError):
        check_bfv_context(ckks, layout)
    other = BFVLayout(layout.preset, QUANT, 3, plain_modulus_above(44, 4096))
    with pytest.raises(ContextError):
        check_bfv_context(public, other)


# ---------------------------------------------------------------------------- bytes


def test_wire_bytes_per_parameter() -> None:
    layout, _, public = _setup()
    numel = 4 * layout.params_per_ciphertext
    chunks = encrypt_bfv(public, pack_bfv(_updates(1, numel)[0], layout), layout)
    per_param = sum(len(c) for c in chunks) / numel
    raw = 2 * 4096 * 8 / layout.params_per_ciphertext  # two polynomials, one 64-bit limb
    assert raw <= per_param <= raw * 1.01
    assert per_param <= 5.5  # the goal
    assert all(len(c) <= layout.preset.max_ciphertext_bytes for c in chunks)
    assert math.isclose(per_param, 5.344, abs_tol=0.01)


def test_bench_rows_compare_the_same_figures() -> None:
    from secure_xfl.bench.bfv import BFVBenchConfig, bfv_rows

    rows = bfv_rows(BFVBenchConfig(numel=3 * 4096, clients=(3,), repeats=1))
    by = {r["metric"]: r for r in rows}
    assert len(rows) == 10 and all(r["ours"] and r["baseline"] for r in rows)
    wire = by["wire bytes/param [bfv-lanes vs xfl-packed]"]
    assert wire["ours"] is not None and wire["ours"] <= 5.5 and (wire["ratio"] or 1) < 0.6
    err = by["sum RMS error / DP noise std, 3 clients [bfv-lanes vs xfl-packed]"]
    assert err["ratio"] == 1.0  # same quantiser, same coins: the same rounding
