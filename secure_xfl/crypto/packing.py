"""Compact fast path: quantised integers packed several per CKKS slot.

Each client quantises its (clipped, noised) update with unbiased stochastic
rounding to ``bits``-bit integers over a public symmetric range ``[-R, R]``,
offset to ``0 .. 2^bits - 1``. ``lanes`` such integers share one CKKS slot as
``Σ_j q_j · 2^(j·B)`` with lane width ``B = bits + headroom``, where the
headroom bits hold the sum of up to ``max_clients`` clients without a carry
into the next lane. CKKS addition then adds every lane exactly, as long as

* the packed sum times the encoding scale stays below the 60-bit data prime's
  half-range (``scale_bits + lanes·B ≤ 58``), and
* the encryption noise summed over ``max_clients`` ciphertexts stays far below
  one half, so the key holder can round to the nearest integer.

The key holder rounds, checks that every slot is an integer within tolerance
and every lane within its possible range (any violation is a typed error),
splits the lanes, removes the ``n·R`` offset and rescales. No cryptography is
implemented here: this module only maps vectors to integer-valued slots.

Error: the dequantised sum of ``n`` clients has per-coordinate error std at
most ``√n · step/2`` with ``step = 2R/(2^bits − 1)`` (stochastic rounding is
unbiased, each rounding error has variance ≤ step²/4). Relative to the DP noise
of the same sum, ``√n·σC/√K``, that is ``√K·R / ((2^bits − 1)·σ·C)``,
independent of ``n``; :meth:`QuantSpec.for_dp` picks ``bits`` so it is ≤ 1 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from secure_xfl.crypto.errors import CodecError, EnvelopeError


class DPConfig(Protocol):
    """The noise parameters a quantiser is sized for (a ``DPSpec`` or ``DPConfig``)."""

    @property
    def clip_norm(self) -> float: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def min_clients(self) -> int: ...
    @property
    def client_noise_std(self) -> float: ...


#: Std of a fresh public-key ciphertext's error in its noisiest slot, in units of
#: 1/scale, for N=4096 with a [60, 49] modulus. Measured: 685 averaged over slots,
#: but the variance differs from slot to slot (it follows the secret key's canonical
#: embedding), so over 2048 slots the worst is ~4x the average; 5x is budgeted.
SLOT_NOISE = 3500.0
#: Largest |decoded − nearest integer| the key holder accepts in a packed slot.
ROUND_TOLERANCE = 0.4
#: The tolerance is at least this many standard deviations of the summed noise.
NOISE_MARGIN = 7.0
#: scale · packed value must stay below this power of two: < q/2 for a 60-bit prime.
PACKED_LIMIT_BITS = 58
#: Noise tail covered by the default range: R = C·(1 + QUANT_TAIL·σ/√K).
QUANT_TAIL = 8.0
#: Default cohort headroom (the aggregator refuses more updates than this).
DEFAULT_MAX_CLIENTS = 8
#: Default bound on the quantisation error std relative to the aggregate's DP noise std.
DEFAULT_REL_ERROR = 0.01

MAX_BITS = 24
MAX_CLIENTS_LIMIT = 1024


@dataclass(frozen=True)
class QuantSpec:
    """Public quantisation and packing parameters, signed in every packed update."""

    bits: int
    """Quantisation levels are ``0 .. 2^bits − 1`` per client and coordinate."""
    max_clients: int
    """Most updates one aggregate may sum; sizes the headroom bits and the CKKS scale."""
    range: float
    """``R``: client values must lie in ``[-R, R]`` (a larger value is refused, not clamped)."""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise CodecError("quantisation bits must be an int")
        if not 2 <= self.bits <= MAX_BITS:
            raise CodecError(f"quantisation bits must lie in [2, {MAX_BITS}]")
        if isinstance(self.max_clients, bool) or not isinstance(self.max_clients, int):
            raise CodecError("max_clients must be an int")
        if not 1 <= self.max_clients <= MAX_CLIENTS_LIMIT:
            raise CodecError(f"max_clients must lie in [1, {MAX_CLIENTS_LIMIT}]")
        r = float(self.range)
        if not math.isfinite(r) or r <= 0:
            raise CodecError("quantisation range must be finite and > 0")
        object.__setattr__(self, "range", r)
        if self.lanes < 1:
            raise CodecError(
                f"{self.lane_bits}-bit lanes do not fit a packed slot of "
                f"{self.value_bits} bits (scale 2^{self.scale_bits})"
            )

    # -- derived layout -----------------------------------------------------------------
    @property
    def headroom_bits(self) -> int:
        """Bits above ``bits`` so ``max_clients`` lane values add without a carry."""
        return max(0, math.ceil(math.log2(self.max_clients)))

    @property
    def lane_bits(self) -> int:
        """Width ``B`` of one lane."""
        return self.bits + self.headroom_bits

    @property
    def scale_bits(self) -> int:
        """log2 of the CKKS scale: the summed noise of ``max_clients`` ciphertexts stays
        ``NOISE_MARGIN`` standard deviations inside ``ROUND_TOLERANCE``."""
        need = SLOT_NOISE * math.sqrt(self.max_clients) * NOISE_MARGIN / ROUND_TOLERANCE
        return max(10, math.ceil(math.log2(need)))

    @property
    def value_bits(self) -> int:
        """Bits a packed slot may use at this scale."""
        return PACKED_LIMIT_BITS - self.scale_bits

    @property
    def lanes(self) -> int:
        """Quantised values per CKKS slot."""
        return self.value_bits // self.lane_bits

    @property
    def mask_modulus(self) -> int:
        """``M = 2^(lanes·B)``: every valid packed sum is below it; pairwise masks add
        modulo it (:mod:`secure_xfl.crypto.cohort`)."""
        return 1 << (self.lanes * self.lane_bits)

    def masked_wrap_log2(self, poly_modulus_degree: int, n_clients: int | None = None) -> float:
        """log2 of a bound on the chance that one CKKS coefficient of a masked sum wraps.

        A masked slot is a centred residue in [−M/2, M/2), uniform and independent
        across slots, so a sum of ``n`` has |slot| ≤ nM/2 but no constant term; every
        coefficient is Σ_j a_j·z_j over ≤ N/2 slots with |a_j| ≤ 2/N. Hoeffding bounds
        P(|coef| ≥ t) ≤ 2·exp(−t²·N / (n·M)²) for t = q/(2Δ) − 1 with q > 2^59
        (one 60-bit data prime). Unmasked sums keep :data:`PACKED_LIMIT_BITS`.
        """
        n = self.max_clients if n_clients is None else n_clients
        t = 2.0 ** (PACKED_LIMIT_BITS + 1 - self.scale_bits) - 1.0
        exponent = t * t * poly_modulus_degree / float(n * self.mask_modulus) ** 2
        return 1.0 - exponent * math.log2(math.e)

    @property
    def levels(self) -> int:
        """Largest quantised value, ``2^bits − 1``."""
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Quantisation step ``2R / (2^bits − 1)``."""
        return 2.0 * self.range / self.levels

    def error_std_bound(self, n_clients: int) -> float:
        """Bound on the per-coordinate quantisation error std of a sum of ``n_clients``."""
        return math.sqrt(n_clients) * self.step / 2.0

    def rel_error(self, dp: DPConfig) -> float:
        """:meth:`error_std_bound` over the DP noise std of the same sum (any ``n``)."""
        if dp.noise_multiplier == 0:
            return math.inf
        return math.sqrt(dp.min_clients) * self.step / (2.0 * dp.noise_multiplier * dp.clip_norm)

    @classmethod
    def for_dp(
        cls,
        dp: DPConfig,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        bits: int | None = None,
        tail: float = QUANT_TAIL,
        rel_error: float = DEFAULT_REL_ERROR,
    ) -> QuantSpec:
        """Derive ``R`` from the clip norm and noise std and ``bits`` from the error target.

        A clipped coordinate is at most ``C`` and the noise exceeds ``tail`` standard
        deviations with negligible probability (8σ: 1.2e-15 per coordinate).
        """
        if dp.noise_multiplier <= 0:
            raise CodecError("packed mode derives its range from DP noise; pass a QuantSpec")
        std = dp.client_noise_std
        r = dp.clip_norm + tail * std
        if bits is None:
            ratio = math.sqrt(dp.min_clients) * r / (rel_error * dp.noise_multiplier * dp.clip_norm)
            bits = max(2, math.ceil(math.log2(ratio + 1)))
        return cls(bits=bits, max_clients=max_clients, range=r)

    # -- wire -----------------------------------------------------------------------------
    def to_wire(self) -> list[Any]:
        """Positional form inside the signed statement."""
        return [self.bits, self.max_clients, self.range]

    @classmethod
    def from_wire(cls, obj: object) -> QuantSpec:
        """Strictly validate the positional form (typed :class:`EnvelopeError`)."""
        if not isinstance(obj, list) or len(obj) != 3:
            raise EnvelopeError("quant must be [bits, max_clients, range]")
        bits, maxc, rng = obj
        if isinstance(rng, bool) or not isinstance(rng, float):
            raise EnvelopeError("quant range must be a float")
        try:
            return cls(bits=bits, max_clients=maxc, range=rng)
        except CodecError as exc:
            raise EnvelopeError(f"bad quant: {exc}") from None

    # -- chunking ---------------------------------------------------------------------------
    def chunk_params(self, numel: int, slots: int) -> list[int]:
        """Parameters carried by each ciphertext (``slots·lanes`` except the last)."""
        per = slots * self.lanes
        full, rest = divmod(numel, per)
        return [per] * full + ([rest] if rest else [])

    def chunk_slots(self, numel: int, slots: int) -> list[int]:
        """Slots used by each ciphertext."""
        return [-(-m // self.lanes) for m in self.chunk_params(numel, slots)]


def _check_range(part: np.ndarray, spec: QuantSpec) -> None:
    peak = float(np.max(np.abs(part)))
    if not math.isfinite(peak):
        raise CodecError("update contains NaN or Inf")
    if peak > spec.range:
        raise CodecError(
            f"update value {peak:.4g} is outside the public quantisation range "
            f"±{spec.range:.4g}; clip the update or widen the range"
        )


def quantise(part: np.ndarray, spec: QuantSpec, rng: np.random.Generator) -> np.ndarray:
    """Stochastically round ``part`` (all within ±R) to int64 levels ``0 .. 2^bits − 1``."""
    _check_range(part, spec)
    u = (part + spec.range) / spec.step
    q = np.floor(u)
    u -= q  # fractional part: round up with exactly that probability (unbiased)
    q += rng.random(u.shape[0]) < u
    np.clip(q, 0, spec.levels, out=q)
    return q.astype(np.int64)


def pack_ints(levels: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Lane-major packing as int64 in [0, M): lane j of slot s holds ``levels[j·S + s]``
    (S = slots used)."""
    lanes = spec.lanes
    n_slots = -(-levels.shape[0] // lanes)
    padded = np.zeros(lanes * n_slots, dtype=np.int64)
    padded[: levels.shape[0]] = levels
    grid = padded.reshape(lanes, n_slots)
    packed: np.ndarray = grid[0].copy()
    for j in range(1, lanes):
        packed += grid[j] << (j * spec.lane_bits)
    return packed


def pack(levels: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """:func:`pack_ints` as the float64 slot values CKKS encodes."""
    # packed < 2^(58 - scale_bits) ≤ 2^48 < 2^53: float64 holds it exactly.
    return np.asarray(pack_ints(levels, spec), dtype=np.float64)


def pack_chunks(
    vec: np.ndarray, spec: QuantSpec, slots: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Packed float64 slot vectors, one per ciphertext, for a flat update."""
    for ints in pack_int_chunks(vec, spec, slots, rng):
        yield np.asarray(ints, dtype=np.float64)


def pack_int_chunks(
    vec: np.ndarray, spec: QuantSpec, slots: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Packed int64 slot vectors in [0, M), one per ciphertext, for a flat update."""
    pos = 0
    for m in spec.chunk_params(vec.shape[0], slots):
        yield pack_ints(quantise(vec[pos : pos + m], spec, rng), spec)
        pos += m


def unpack_sum(
    values: np.ndarray, spec: QuantSpec, n_clients: int, n_params: int, *, masked: bool = False
) -> np.ndarray:
    """Invert :func:`pack` for a sum of ``n_clients`` updates and dequantise it.

    ``masked``: the updates carried pairwise masks mod M (centred), so the rounded sum
    is first reduced mod M, where the masks cancel.

    Returns the float64 sum of the clients' values. Raises :class:`CodecError` when
    a slot is not an integer within :data:`ROUND_TOLERANCE` or a lane lies outside
    ``[0, n_clients·(2^bits − 1)]`` (a carry, a foreign ciphertext or a wrong scale).
    """
    if not 1 <= n_clients <= spec.max_clients:
        raise CodecError(f"{n_clients} clients outside 1..max_clients={spec.max_clients}")
    lanes = spec.lanes
    n_slots = -(-n_params // lanes)
    if values.shape != (n_slots,):
        raise CodecError(f"packed chunk has {values.shape} slots, expected {n_slots}")
    rounded = np.rint(values)
    dev = float(np.max(np.abs(values - rounded))) if n_slots else 0.0
    if not dev <= ROUND_TOLERANCE:  # also catches NaN
        raise CodecError(f"packed slot is {dev:.3f} away from an integer (noise or tampering)")
    lane_max = n_clients * spec.levels
    top = sum(lane_max << (j * spec.lane_bits) for j in range(lanes))
    if masked:
        bound = float(n_clients * spec.mask_modulus // 2)
        if n_slots and float(np.max(np.abs(rounded))) > bound:
            raise CodecError("masked slot outside the range of a sum of masked updates")
        rounded = np.mod(rounded.astype(np.int64), spec.mask_modulus)
    if float(rounded.min()) < 0 or float(rounded.max()) > top:
        raise CodecError("packed slot outside the range of a sum of valid updates")
    ints = rounded.astype(np.int64)
    mask = (1 << spec.lane_bits) - 1
    out = np.empty(lanes * n_slots, dtype=np.float64)
    for j in range(lanes):
        lane = (ints >> (j * spec.lane_bits)) & mask
        if int(lane.max()) > lane_max:
            raise CodecError(f"lane {j} exceeds the sum of {n_clients} updates: a carry")
        out[j * n_slots : (j + 1) * n_slots] = lane
    out = out[:n_params]
    out *= spec.step
    out -= n_clients * spec.range
    return out


def unpack_vector(
    chunk_values: Sequence[np.ndarray],
    spec: QuantSpec,
    n_clients: int,
    numel: int,
    slots: int,
    *,
    masked: bool = False,
) -> np.ndarray:
    """:func:`unpack_sum` over every chunk of an aggregate, concatenated."""
    params = spec.chunk_params(numel, slots)
    if len(chunk_values) != len(params):
        raise CodecError(f"{len(chunk_values)} packed chunks, expected {len(params)}")
    out = np.empty(numel, dtype=np.float64)
    pos = 0
    for vals, m in zip(chunk_values, params, strict=True):
        out[pos : pos + m] = unpack_sum(vals, spec, n_clients, m, masked=masked)
        pos += m
    return out
