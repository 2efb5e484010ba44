"""BFV lane packing: quantised integers packed several per BFV integer slot.

A building block, **not yet wired into the envelopes, services or protocol**: a
later session integrates it as a preset next to ``xfl-packed``. It reuses the
CKKS fast path's quantiser (:class:`QuantSpec`: stochastic rounding to ``bits``,
headroom bits for ``max_clients``) and the HE-standard 128-bit check of
:mod:`secure_xfl.crypto.context`; only the slot arithmetic differs.

Why BFV: a batched ciphertext holds N integer slots (CKKS: N/2 real ones), added
exactly mod the plain modulus ``t`` (no scale, no rounding tolerance). With N = 4096
and one 60-bit data prime (+ the 49-bit special prime: 109 bits, the 128-bit limit)
a 2 × 4096 × 8 B ciphertext carries ``N · lanes`` parameters: 5.34 B/param at 3 lanes.

Layout (:class:`BFVLayout`): lane j of slot s holds quantised value
``q[j·S + s]`` of its chunk, the slot is ``Σ_j q_j · 2^(j·B)`` with ``B =
quant.lane_bits``, and ``t`` is the smallest prime ``≡ 1 (mod 2N)`` (batching)
above ``2^(lanes·B + headroom)``. Hence, for ``M = 2^(lanes·B)``:

* a packed sum of ≤ ``max_clients`` clients is < M < t (no lane carries), and
* ``max_clients · M ≤ t``, so future pairwise masks compose either natively
  mod ``t`` (each slot uniform in [0, t), the sum reduced mod t by BFV) or mod
  ``M`` inside ``t`` (each client reduces mod M; the sum cannot wrap mod t; the
  key holder reduces the decrypted slots mod M before :func:`unpack_bfv`).

Lanes are the most that keep the decryption noise of a ``max_clients`` sum
inside the budget ``2·t·bound < q`` (see :data:`NOISE_SIGMAS`). No cryptography
is implemented here; TenSEAL/SEAL encrypts, adds and decrypts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from secure_xfl.crypto.context import check_security
from secure_xfl.crypto.errors import CodecError, ContextError, EnvelopeError, InsecureParameters
from secure_xfl.crypto.packing import QuantSpec, quantise

#: Ring dimensions offered: 4096 (128-bit) and 8192 (same bytes per parameter, more margin).
SUPPORTED_DEGREES = (4096, 8192)
MAX_PLAIN_BITS = 60  #: SEAL refuses larger plain moduli.
MIN_SPECIAL_BITS = 30  #: A special prime this large divides the public-key noise away.
#: SEAL encrypts at the key level and divides by the special prime, which leaves the
#: rounding noise r0 + r1·s (r uniform in ±1/2, s ternary): per-coefficient std
#: sqrt((1 + 2N/3)/12) = 15.1 at N=4096. Measured: fresh N=4096 ciphertexts start to
#: decrypt wrongly at t ≈ 2^53.5 (max coefficient ≈ q/2t ≈ 50 ≈ 3.5σ over 4096, as
#: expected), a sum of 8 at t ≈ 2^52. The budget takes twice that std ...
NOISE_STD_FACTOR = 2.0
#: ... and this many standard deviations of a ``max_clients`` sum (tail ~1e-32).
NOISE_SIGMAS = 12.0
#: Serialisation overhead allowed above the raw polynomial bytes (measured: 131 B).
CIPHERTEXT_SLACK = 4096


def is_prime(n: int) -> bool:
    """Primality of a plain-modulus candidate (public, not key material), by sympy."""
    try:
        from sympy import isprime  # installed with torch; imported here: ~0.3 s
    except ImportError:
        raise ContextError("deriving a BFV plain modulus needs sympy") from None
    return bool(isprime(n))


def plain_modulus_above(bits: int, poly_modulus_degree: int) -> int:
    """Smallest prime ``t > 2^bits`` with ``t ≡ 1 (mod 2N)`` (SEAL's batching condition)."""
    m = 2 * poly_modulus_degree
    k = (1 << bits) // m + 1
    while not is_prime(k * m + 1):
        k += 1
    return k * m + 1


@dataclass(frozen=True)
class BFVPreset:
    """Named BFV ring and coefficient modulus; the plain modulus follows the quantiser."""

    name: str
    """Identifier both sides agree on (a later envelope carries it)."""
    poly_modulus_degree: int
    """Ring dimension N: a batched ciphertext holds N integer slots."""
    coeff_mod_bit_sizes: tuple[int, ...]
    """RNS prime sizes; the last is the special prime, the others stay in a ciphertext."""
    description: str = ""
    """Why the preset exists."""

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in SUPPORTED_DEGREES:
            raise InsecureParameters(f"BFV lanes support N in {SUPPORTED_DEGREES}")
        check_security(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if self.coeff_mod_bit_sizes[-1] < MIN_SPECIAL_BITS:
            raise InsecureParameters(f"the special prime needs ≥ {MIN_SPECIAL_BITS} bits")

    @property
    def data_primes(self) -> int:
        """RNS limbs a fresh ciphertext carries."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def q_bits_floor(self) -> int:
        """A lower bound on log2 q: SEAL's b-bit primes lie in (2^(b−1), 2^b)."""
        return sum(self.coeff_mod_bit_sizes[:-1]) - self.data_primes

    def noise_bound(self, n_clients: int) -> float:
        """Budgeted decryption noise of a sum of ``n_clients`` fresh ciphertexts."""
        std = NOISE_STD_FACTOR * math.sqrt((1 + 2 * self.poly_modulus_degree / 3) / 12)
        return NOISE_SIGMAS * std * math.sqrt(n_clients) + n_clients  # + encoding roundings

    def max_plain_bits(self, n_clients: int) -> int:
        """Most bits ``t`` may have so ``2·t·noise_bound < q`` holds for the sum."""
        budget = self.q_bits_floor - 1 - math.log2(self.noise_bound(n_clients))
        return min(MAX_PLAIN_BITS, math.floor(budget))

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound on one serialised ciphertext (2 polys × N × limbs × 8 B + slack)."""
        return 2 * self.poly_modulus_degree * self.data_primes * 8 + CIPHERTEXT_SLACK

    def layout(self, quant: QuantSpec) -> BFVLayout:
        """Lanes and plain modulus for ``quant`` (typed :class:`CodecError` if none fit)."""
        room = self.max_plain_bits(quant.max_clients) - 1 - quant.headroom_bits
        lanes = room // quant.lane_bits
        if lanes < 1:
            raise CodecError(f"{quant} exceeds the noise budget of BFV preset {self.name!r}")
        t = plain_modulus_above(
            lanes * quant.lane_bits + quant.headroom_bits, self.poly_modulus_degree
        )
        return BFVLayout(self, quant, lanes, t)


@dataclass(frozen=True)
class BFVLayout:
    """How one quantiser's values sit in one preset's slots (derive with ``preset.layout``)."""

    preset: BFVPreset
    """Ring and coefficient modulus."""
    quant: QuantSpec
    """Quantisation bits, headroom and range, shared with the CKKS packed path."""
    lanes: int
    """Quantised values per slot."""
    plain_modulus: int
    """``t``: prime, ``≡ 1 (mod 2N)``, ``≥ max_clients · M``, within the noise budget."""

    def __post_init__(self) -> None:
        t, n = self.plain_modulus, self.preset.poly_modulus_degree
        if (t - 1) % (2 * n) or not is_prime(t):
            raise CodecError(f"plain modulus {t} is not a prime ≡ 1 mod {2 * n}")
        if t < self.quant.max_clients * self.mask_modulus:
            raise CodecError("plain modulus leaves no room for max_clients · M")
        if t.bit_length() > self.preset.max_plain_bits(self.quant.max_clients):
            raise CodecError(f"a {t.bit_length()}-bit plain modulus exceeds the noise budget")

    @property
    def lane_bits(self) -> int:
        """Width ``B`` of one lane (``bits + headroom``)."""
        return self.quant.lane_bits

    @property
    def shifts(self) -> np.ndarray:
        """Bit offset of each lane, as a column for broadcasting."""
        return (np.arange(self.lanes, dtype=np.int64) * self.lane_bits)[:, None]

    @property
    def mask_modulus(self) -> int:
        """``M = 2^(lanes·B)``: every valid packed sum is below it."""
        return 1 << (self.lanes * self.lane_bits)

    @property
    def params_per_ciphertext(self) -> int:
        """Parameters one full ciphertext carries."""
        return self.preset.poly_modulus_degree * self.lanes

    def chunk_params(self, numel: int) -> list[int]:
        """Parameters per ciphertext (all full but the last)."""
        full, rest = divmod(numel, self.params_per_ciphertext)
        return [self.params_per_ciphertext] * full + ([rest] if rest else [])

    def chunk_slots(self, numel: int) -> list[int]:
        """Slots each ciphertext uses."""
        return [-(-m // self.lanes) for m in self.chunk_params(numel)]


BFV_PRESETS: dict[str, BFVPreset] = {
    p.name: p
    for p in (
        BFVPreset(
            name="bfv-lanes",
            poly_modulus_degree=4096,
            coeff_mod_bit_sizes=(60, 49),
            description="Fewest bytes: one 60-bit data prime; 109 bits = N=4096's 128-bit limit.",
        ),
        BFVPreset(
            name="bfv-lanes-8192",
            poly_modulus_degree=8192,
            coeff_mod_bit_sizes=(60, 49),
            description="Same B/param at twice the ring: 109 ≤ 118, N=8192's 256-bit limit.",
        ),
    )
}
DEFAULT_BFV_PRESET = "bfv-lanes"


def get_bfv_preset(name: str) -> BFVPreset:
    """Look up a BFV preset by name with a typed error."""
    try:
        return BFV_PRESETS[name]
    except KeyError:
        raise ContextError(f"unknown BFV preset {name!r}; known: {sorted(BFV_PRESETS)}") from None


def generate_bfv_context(layout: BFVLayout, *, n_threads: int | None = None) -> ts.Context:
    """A fresh BFV context with a secret key (key holder only); no relin/Galois keys."""
    p = layout.preset
    try:
        return ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=p.poly_modulus_degree,
            plain_modulus=layout.plain_modulus,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            n_threads=n_threads,
        )
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise ContextError(f"TenSEAL refused the BFV parameters: {exc}") from None


def check_bfv_context(ctx: ts.Context, layout: BFVLayout) -> None:
    """Refuse a (public or secret) context whose scheme, ring, t or limbs differ."""
    import tenseal.sealapi  # noqa: F401  (registers the Modulus type used below)

    try:
        data = ctx.seal_context().data.first_context_data()
        parms = data.parms()
        primes = [m.bit_count() for m in parms.coeff_modulus()]
        batching = bool(data.qualifiers().using_batching)
        got = (parms.poly_modulus_degree(), parms.plain_modulus().value(), primes, batching)
    except Exception as exc:
        raise ContextError(f"not a BFV context: {exc}") from None
    p = layout.preset
    want = (p.poly_modulus_degree, layout.plain_modulus, list(p.coeff_mod_bit_sizes[:-1]), True)
    if got != want:
        raise ContextError(f"context (N, t, data primes, batching)={got} does not match {want}")


def pack_bfv(
    values: np.ndarray, layout: BFVLayout, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Stochastically round ``values`` (all within ±R) and pack them, one int64 vector
    (entries in [0, M) ⊂ [0, t)) per ciphertext; out-of-range values are refused."""
    if values.ndim != 1 or values.shape[0] == 0:
        raise CodecError("cannot pack an empty or multi-dimensional vector")
    if rng is None:  # stochastic rounding needs unpredictable coins
        rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence()))
    levels = quantise(np.asarray(values, dtype=np.float64), layout.quant, rng)
    out: list[np.ndarray] = []
    pos, n = 0, values.shape[0]
    for m, s in zip(layout.chunk_params(n), layout.chunk_slots(n), strict=True):
        grid = np.zeros((layout.lanes, s), dtype=np.int64)
        grid.reshape(-1)[:m] = levels[pos : pos + m]
        out.append(np.bitwise_or.reduce(grid << layout.shifts, axis=0))
        pos += m
    return out


def encrypt_bfv(ctx: ts.Context, slots: Iterable[np.ndarray], layout: BFVLayout) -> list[bytes]:
    """One serialised ciphertext per slot vector of ints in [0, t) (TenSEAL would reduce
    others mod t silently); the public context suffices."""
    out = []
    for v in slots:
        n = layout.preset.poly_modulus_degree
        if v.ndim != 1 or not 0 < v.shape[0] <= n or not np.issubdtype(v.dtype, np.integer):
            raise CodecError(f"slot vector {v.dtype}{v.shape} is not ≤ {n} integers")
        if int(v.min()) < 0 or int(v.max()) >= layout.plain_modulus:
            raise CodecError("slot value outside [0, t)")
        out.append(bytes(ts.bfv_vector(ctx, v.tolist()).serialize()))
    return out


def load_bfv(ctx: ts.Context, data: bytes, layout: BFVLayout, *, expected_len: int) -> ts.BFVVector:
    """Parse one ciphertext and check it is a fresh-shaped ciphertext of ``layout``.

    SEAL refuses a ciphertext of other parameters (another t, a CKKS one) when it
    loads; empty, truncated or oversized bytes and wrong sizes are refused here.
    """
    if not data or len(data) > layout.preset.max_ciphertext_bytes:
        raise EnvelopeError(f"BFV ciphertext of {len(data)} bytes is empty or too large")
    try:
        vec = ts.bfv_vector_from(ctx, data)
        parts = vec.ciphertext()
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise EnvelopeError(f"cannot parse BFV ciphertext: {exc}") from None
    if len(parts) != 1 or vec.size() != expected_len:
        raise EnvelopeError(f"ciphertext holds {vec.size()} slots, expected {expected_len}")
    ct = parts[0]
    got = (ct.size(), ct.poly_modulus_degree(), ct.coeff_modulus_size(), ct.is_transparent())
    if got != (2, layout.preset.poly_modulus_degree, layout.preset.data_primes, False):
        raise EnvelopeError("not a fresh ciphertext of the agreed BFV preset")
    return vec


class BFVSum:
    """Running ciphertext sum: memory is one update plus the sum, whatever the cohort."""

    def __init__(self, ctx: ts.Context, layout: BFVLayout, numel: int) -> None:
        self.ctx, self.layout, self.count = ctx, layout, 0
        self._lengths = layout.chunk_slots(numel)
        self._sum: list[ts.BFVVector] | None = None

    def add(self, chunks: Sequence[bytes]) -> None:
        """Add one client's ciphertexts; all are parsed before any is added."""
        if self.count >= self.layout.quant.max_clients:
            raise CodecError(f"the sum already holds max_clients={self.layout.quant.max_clients}")
        if len(chunks) != len(self._lengths):
            raise EnvelopeError(f"{len(chunks)} ciphertexts, expected {len(self._lengths)}")
        vecs = [
            load_bfv(self.ctx, c, self.layout, expected_len=n)
            for c, n in zip(chunks, self._lengths, strict=True)
        ]
        if self._sum is None:
            self._sum = vecs
        else:
            for acc, v in zip(self._sum, vecs, strict=True):
                acc.add_(v)
        self.count += 1

    def result(self) -> list[bytes]:
        """The summed ciphertexts, serialised."""
        if self._sum is None:
            raise CodecError("no update was added")
        return [bytes(v.serialize()) for v in self._sum]


def sum_bfv(
    ctx: ts.Context, layout: BFVLayout, numel: int, uploads: Iterable[Sequence[bytes]]
) -> list[bytes]:
    """Sum several clients' ciphertext lists (see :class:`BFVSum`)."""
    acc = BFVSum(ctx, layout, numel)
    for chunks in uploads:
        acc.add(chunks)
    return acc.result()


def decrypt_bfv_slots(
    secret_ctx: ts.Context, chunks: Sequence[bytes], layout: BFVLayout, numel: int
) -> list[np.ndarray]:
    """Decrypt summed ciphertexts to their int64 slot values in [0, t) (key holder)."""
    if not secret_ctx.has_secret_key():
        raise ContextError("decryption needs the secret-key context")
    lengths = layout.chunk_slots(numel)
    if len(chunks) != len(lengths):
        raise EnvelopeError(f"{len(chunks)} ciphertexts, expected {len(lengths)}")
    out = []
    for c, n in zip(chunks, lengths, strict=True):
        vals = np.asarray(load_bfv(secret_ctx, c, layout, expected_len=n).decrypt(), np.int64)
        out.append(vals % layout.plain_modulus)  # SEAL decodes centred: back to [0, t)
    return out


def unpack_bfv(
    slot_values: Sequence[np.ndarray], layout: BFVLayout, n_clients: int, numel: int
) -> np.ndarray:
    """Split lanes of a sum of ``n_clients`` updates and dequantise: the float64 sum.

    A slot above the largest valid packed sum or a lane above ``n_clients·(2^bits−1)``
    (a carry, another key's ciphertext, unreduced masks) is a :class:`CodecError`.
    """
    if not 1 <= n_clients <= layout.quant.max_clients:
        raise CodecError(f"{n_clients} clients outside 1..max_clients={layout.quant.max_clients}")
    params = layout.chunk_params(numel)
    if len(slot_values) != len(params):
        raise CodecError(f"{len(slot_values)} slot vectors, expected {len(params)}")
    lane_max = n_clients * layout.quant.levels
    top = sum(lane_max << (j * layout.lane_bits) for j in range(layout.lanes))
    mask = (1 << layout.lane_bits) - 1
    out = np.empty(numel, dtype=np.float64)
    pos = 0
    for ints, m in zip(slot_values, params, strict=True):
        s = -(-m // layout.lanes)
        if ints.shape != (s,):
            raise CodecError(f"slot vector has shape {ints.shape}, expected ({s},)")
        if int(ints.min()) < 0 or int(ints.max()) > top:
            raise CodecError("slot outside the range of a sum of valid updates")
        lanes = (ints[None, :] >> layout.shifts) & mask
        if int(lanes.max()) > lane_max:
            raise CodecError(f"a lane exceeds the sum of {n_clients} updates: a carry")
        out[pos : pos + m] = lanes.reshape(-1)[:m]
        pos += m
    out *= layout.quant.step
    out -= n_clients * layout.quant.range
    return out


def decrypt_unpack_bfv(
    secret_ctx: ts.Context, chunks: Sequence[bytes], layout: BFVLayout, n_clients: int, numel: int
) -> np.ndarray:
    """:func:`decrypt_bfv_slots` then :func:`unpack_bfv`: the dequantised sum."""
    slots = decrypt_bfv_slots(secret_ctx, chunks, layout, numel)
    return unpack_bfv(slots, layout, n_clients, numel)
