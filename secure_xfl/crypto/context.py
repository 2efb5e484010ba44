"""CKKS parameter presets, key generation and context (de)serialisation.

Only the key holder ever creates or loads a context with a secret key; every
other party receives :func:`public_context_bytes`, which is produced from a
copy made public by SEAL itself and is checked to carry no secret key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tenseal as ts

from secure_xfl.crypto.errors import ContextError, InsecureParameters

#: Max total coefficient-modulus bits for 128-bit classical security with a
#: ternary secret, per ring dimension N (HomomorphicEncryption.org standard,
#: Table 1; the same limits SEAL enforces as ``sec_level_type.tc128``).
HE_STANDARD_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: Serialised contexts are bounded before parsing; a secret context for
#: N=32768 is a few MB, so 256 MiB leaves room without allowing abuse.
MAX_CONTEXT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CKKSPreset:
    """Named HE parameter set: CKKS, or BFV lanes (``scheme="bfv"``, see ``lanes.py``)."""

    name: str
    """Identifier carried in envelopes so both sides agree on the parameters."""
    poly_modulus_degree: int
    """Ring dimension N; a ciphertext holds N/2 slots."""
    coeff_mod_bit_sizes: tuple[int, ...]
    """Bit sizes of the RNS primes; the last is SEAL's special (key-switching) prime."""
    scale_bits: int
    """log2 of the encoding scale Δ: the fixed-point precision of each slot."""
    depth: int
    """Plaintext-scalar multiplications a ciphertext can absorb (rescalings)."""
    rel_error: float = 1e-4
    """Measured relative slot error after one weighted sum (documentation and tests)."""
    abs_error: float = 1e-5
    """Measured absolute slot error floor per summed ciphertext."""
    description: str = ""
    """Why the preset exists."""
    packed: bool = False
    """Slots carry quantised integers packed several per slot (sums only; see packing.py)."""
    scheme: Literal["ckks", "bfv"] = "ckks"
    """``bfv``: integer slots mod a plain modulus the quantiser fixes (``bfv.py``); a BFV
    preset is always packed and ``scale_bits``/``depth`` do not apply."""

    def __post_init__(self) -> None:
        check_security(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if len(self.coeff_mod_bit_sizes) != self.depth + 2:
            raise InsecureParameters(
                f"preset {self.name!r}: depth {self.depth} needs {self.depth + 2} primes "
                f"(data prime, {self.depth} rescaling primes, special prime)"
            )
        if not 10 <= self.scale_bits <= 60:
            raise InsecureParameters(f"preset {self.name!r}: scale_bits out of range")
        if self.scheme == "bfv" and not self.packed:
            raise InsecureParameters(f"preset {self.name!r}: BFV presets are packed")

    @property
    def slots(self) -> int:
        """Values per ciphertext (CKKS: N/2 real slots; BFV: N integer slots)."""
        return self.poly_modulus_degree // (1 if self.scheme == "bfv" else 2)

    @property
    def fresh_levels(self) -> int:
        """RNS limbs a fresh ciphertext carries (all primes but the special one)."""
        return len(self.coeff_mod_bit_sizes) - 1

    def error_bound(self, max_abs: float, n_clients: int, total_multiplier: float = 1.0) -> float:
        """Bound on |decrypted weighted average − exact| for inputs with |x| ≤ ``max_abs``.

        The absolute floor is added once per summed ciphertext and is not
        scaled by the weights, so it is divided by Σ multipliers.
        """
        return self.rel_error * max_abs + self.abs_error * n_clients / total_multiplier

    @property
    def max_abs_value(self) -> float:
        """Largest |slot value| an aggregate can hold after the last rescale without wrapping."""
        return float(2 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 1))

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound on one serialised ciphertext chunk (2 polys x N x limbs x 8 B + slack)."""
        raw = 2 * self.poly_modulus_degree * self.fresh_levels * 8
        return raw + raw // 8 + 4096


def check_security(poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...]) -> None:
    """Refuse parameters below 128-bit security per the HE standard table."""
    limit = HE_STANDARD_128.get(poly_modulus_degree)
    if limit is None:
        raise InsecureParameters(
            f"poly_modulus_degree {poly_modulus_degree} is not one of {sorted(HE_STANDARD_128)}"
        )
    total = sum(coeff_mod_bit_sizes)
    if total > limit:
        raise InsecureParameters(
            f"total coefficient modulus {total} bits exceeds the 128-bit limit of {limit} bits "
            f"for N={poly_modulus_degree}"
        )
    if any(not 17 <= b <= 60 for b in coeff_mod_bit_sizes) or len(coeff_mod_bit_sizes) < 2:
        raise InsecureParameters("each prime must have 17..60 bits and there must be at least two")


PRESETS: dict[str, CKKSPreset] = {
    p.name: p
    for p in (
        CKKSPreset(
            name="nvflare-default",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 40, 40),
            scale_bits=40,
            depth=1,
            rel_error=2e-6,
            abs_error=1e-7,
            description="NVIDIA FLARE's default TenSEAL setup, kept as the comparison baseline.",
        ),
        CKKSPreset(
            name="xfl-default",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(49, 30, 30),
            scale_bits=30,
            depth=1,
            rel_error=1e-4,
            abs_error=2e-5,
            description=(
                "Smallest ring meeting 128-bit security that still allows one aggregator-side "
                "scalar weight: sums plus one multiply; about 1e-5 absolute slot error."
            ),
        ),
        CKKSPreset(
            name="xfl-sum",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            scale_bits=40,
            depth=0,
            rel_error=1e-8,
            abs_error=1e-7,
            description=(
                "Sums only (clients pre-weight their updates): one data prime, fewest bytes."
            ),
        ),
        CKKSPreset(
            name="xfl-packed",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            scale_bits=16,
            depth=0,
            rel_error=0.0,
            abs_error=0.0,
            packed=True,
            description=(
                "Compact fast path: b-bit stochastically rounded integers, several per slot "
                "with headroom for the sum; the 49-bit special prime absorbs public-key "
                "encryption noise so a 60-bit data prime leaves 40 bits per slot at scale "
                "2^18 (8 clients). Error is the quantisation's (QuantSpec), not CKKS's. "
                "Sums only."
            ),
        ),
        CKKSPreset(
            name="bfv-lanes",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            scale_bits=16,
            depth=0,
            rel_error=0.0,
            abs_error=0.0,
            packed=True,
            scheme="bfv",
            description=(
                "Fewest bytes: the same lanes in BFV's N integer slots (CKKS has N/2), "
                "added exactly mod a prime t ≥ max_clients·2^(lanes·B) fixed at provisioning "
                "from the DP settings (bfv.py). About 5.4 B/param. Sums only."
            ),
        ),
    )
}

DEFAULT_PRESET = "xfl-default"


def get_preset(name: str) -> CKKSPreset:
    """Look up a preset by name with a clear error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ContextError(f"unknown CKKS preset {name!r}; known: {sorted(PRESETS)}") from None


def generate_context(preset: CKKSPreset | str = DEFAULT_PRESET) -> ts.Context:
    """Create a fresh CKKS context with a secret key (key holder only; BFV presets:
    :func:`secure_xfl.crypto.lanes.new_context`)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.scheme != "ckks":
        raise ContextError(f"preset {p.name!r} is not CKKS: use lanes.new_context")
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=p.poly_modulus_degree,
        coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
    )
    ctx.global_scale = float(2**p.scale_bits)
    # Sums and plaintext scalars never need relinearisation or rotations, so no
    # relin/Galois keys: smaller public material and nothing extra to leak.
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """Serialise a copy of ``ctx`` with the secret key removed by SEAL."""
    pub = ctx.copy()
    pub.make_context_public()
    if pub.has_secret_key() or not pub.is_public():
        raise ContextError("public context still holds a secret key")
    return bytes(pub.serialize(save_public_key=True, save_secret_key=False))


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """Serialise the full context including the secret key (key holder's files only)."""
    if not ctx.has_secret_key():
        raise ContextError("context has no secret key")
    return bytes(ctx.serialize(save_public_key=True, save_secret_key=True))


def load_context(data: bytes, *, require_secret: bool | None = None) -> ts.Context:
    """Parse a serialised context, bounded and typed.

    ``require_secret=False`` refuses a context carrying a secret key (what every
    party but the key holder must load); ``True`` requires one.
    """
    if not data or len(data) > MAX_CONTEXT_BYTES:
        raise ContextError(f"context is empty or larger than {MAX_CONTEXT_BYTES} bytes")
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise ContextError(f"cannot parse CKKS context: {exc}") from None
    has_secret = ctx.has_secret_key()
    if require_secret is False and has_secret:
        raise ContextError("refusing a context that carries a secret key")
    if require_secret is True and not has_secret:
        raise ContextError("context has no secret key")
    if not ctx.has_public_key():
        raise ContextError("context has no public key")
    return ctx


def write_secret_context(path: Path, ctx: ts.Context) -> None:
    """Write the secret context with mode 0600 from creation (never world-readable)."""
    data = secret_context_bytes(ctx)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def read_context_file(path: Path, *, require_secret: bool | None = None) -> ts.Context:
    """Load a context file, size-bounded before reading."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ContextError(f"cannot read {path}: {exc}") from None
    if size > MAX_CONTEXT_BYTES:
        raise ContextError(f"{path} is larger than {MAX_CONTEXT_BYTES} bytes")
    return load_context(path.read_bytes(), require_secret=require_secret)


def check_context_matches(ctx: ts.Context, preset: CKKSPreset) -> None:
    """Refuse a context whose ring, modulus chain or scale differ from ``preset``.

    TenSEAL does not expose the parameters directly, so one probe encryption
    reveals them.
    """
    try:
        probe = ts.ckks_vector(ctx, [0.0]).ciphertext()[0]
    except ValueError as exc:  # a BFV context: "no global scale" / "unsupported scheme"
        raise ContextError(f"not a CKKS context of preset {preset.name!r}: {exc}") from None
    got = (probe.poly_modulus_degree(), probe.coeff_modulus_size(), probe.scale)
    want = (preset.poly_modulus_degree, preset.fresh_levels, float(2**preset.scale_bits))
    if got != want:
        raise ContextError(
            f"context (N, limbs, scale)={got} does not match preset {preset.name!r} {want}"
        )
