"""Update codec: named tensors ↔ deterministic layout ↔ flat vector ↔ CKKS chunks.

Both sides derive the same :class:`TensorLayout` from the model and compare its
digest, so a ciphertext can only ever be summed with, or decoded into, the
exact tensors it was made from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tenseal as ts

from secure_xfl.crypto.context import CKKSPreset, load_context
from secure_xfl.crypto.errors import CodecError, EnvelopeError, LayoutMismatch

if TYPE_CHECKING:
    import torch

#: Upper bound on the elements of one update (2^31: a 2-billion-parameter trainable part).
MAX_ELEMENTS = 2**31
#: Bound on tensors per layout and on a tensor name's length.
MAX_TENSORS = 100_000
MAX_NAME_LEN = 512

#: Floating-point dtype names a layout may hold. torch is imported only by the functions
#: that take or make tensors, so numpy-only users (the load generator's simulated
#: clients, which seal a flat vector) never pay its ~300 MB of RSS.
_FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor in a layout."""

    name: str
    """Key in the state dict."""
    shape: tuple[int, ...]
    """Tensor shape."""
    dtype: str
    """torch dtype name without the ``torch.`` prefix; floating point only."""

    @property
    def numel(self) -> int:
        """Element count."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorLayout:
    """Ordered tensor specs (sorted by name) and their digest."""

    specs: tuple[TensorSpec, ...]
    """The tensors, sorted by name so every party orders them alike."""

    @property
    def numel(self) -> int:
        """Total elements of the flat vector."""
        return sum(s.numel for s in self.specs)

    @property
    def digest(self) -> bytes:
        """SHA-256 over the canonical JSON of the specs."""
        canon = json.dumps(
            [[s.name, list(s.shape), s.dtype] for s in self.specs], separators=(",", ":")
        )
        return hashlib.sha256(b"secure-xfl/layout/v1\0" + canon.encode()).digest()

    def num_chunks(self, slots: int) -> int:
        """Ciphertexts needed at ``slots`` values each."""
        return -(-self.numel // slots)

    def check(self, other_digest: bytes) -> None:
        """Raise :class:`LayoutMismatch` when a peer's layout digest differs."""
        if other_digest != self.digest:
            raise LayoutMismatch(
                f"layout digest {other_digest.hex()[:16]}… does not match ours "
                f"{self.digest.hex()[:16]}…"
            )


def layout_of(tensors: Mapping[str, torch.Tensor]) -> TensorLayout:
    """Derive the layout of a mapping of named floating-point tensors."""
    import torch

    if not tensors:
        raise CodecError("update is empty: no tensors")
    if len(tensors) > MAX_TENSORS:
        raise CodecError(f"more than {MAX_TENSORS} tensors")
    specs = []
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise CodecError(f"tensor name must be a non-empty string ≤ {MAX_NAME_LEN} chars")
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _FLOAT_DTYPE_NAMES:
            raise CodecError(f"{name}: dtype {dtype} is not floating point")
        specs.append(TensorSpec(name, tuple(int(d) for d in t.shape), dtype))
    layout = TensorLayout(tuple(specs))
    if layout.numel == 0:
        raise CodecError("update is empty: zero elements")
    if layout.numel > MAX_ELEMENTS:
        raise CodecError(f"update has {layout.numel} elements, more than {MAX_ELEMENTS}")
    return layout


def flatten(tensors: Mapping[str, torch.Tensor], layout: TensorLayout) -> np.ndarray:
    """Concatenate tensors in layout order into one float64 vector; rejects NaN/Inf."""
    import torch

    if layout_of(tensors) != layout:
        raise LayoutMismatch("tensors do not match the expected layout")
    out = np.empty(layout.numel, dtype=np.float64)
    pos = 0
    for spec in layout.specs:
        t = tensors[spec.name].detach().to("cpu", torch.float64).reshape(-1)
        out[pos : pos + spec.numel] = t.numpy()
        pos += spec.numel
    if not np.isfinite(out).all():
        bad = next(s.name for s in layout.specs if not torch.isfinite(tensors[s.name]).all())
        raise CodecError(f"{bad}: update contains NaN or Inf")
    return out


def unflatten(vec: np.ndarray, layout: TensorLayout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: named tensors with the layout's shapes and dtypes."""
    import torch

    if vec.ndim != 1 or vec.shape[0] != layout.numel:
        raise LayoutMismatch(f"vector of {vec.shape} does not fit a layout of {layout.numel}")
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for spec in layout.specs:
        piece = torch.from_numpy(np.ascontiguousarray(vec[pos : pos + spec.numel]))
        out[spec.name] = piece.reshape(spec.shape).to(_torch_dtype(spec.dtype))
        pos += spec.numel
    return out


def chunks(vec: np.ndarray, slots: int) -> Iterator[np.ndarray]:
    """Views of ``vec`` of at most ``slots`` elements (the last may be shorter)."""
    for start in range(0, vec.shape[0], slots):
        yield vec[start : start + slots]


def encrypt_vector(
    ctx: ts.Context,
    vec: np.ndarray,
    preset: CKKSPreset,
    *,
    pool: EncryptionPool | None = None,
) -> list[bytes]:
    """Encrypt a flat vector under the public key as serialised CKKS chunks."""
    if vec.ndim != 1 or vec.shape[0] == 0:
        raise CodecError("cannot encrypt an empty vector")
    if not np.isfinite(vec).all():
        raise CodecError("vector contains NaN or Inf")
    return encrypt_slots(ctx, chunks(vec, preset.slots), pool=pool)


def _encrypt_one(ctx: ts.Context, values: np.ndarray, scale: float | None) -> bytes:
    # tolist() is the fastest way into TenSEAL's std::vector<double> (~25 ns/value).
    vec = ts.ckks_vector(ctx, values.tolist(), scale)
    return bytes(vec.serialize())


def encrypt_slots(
    ctx: ts.Context,
    slot_vectors: Iterable[np.ndarray],
    *,
    scale: float | None = None,
    pool: EncryptionPool | None = None,
) -> list[bytes]:
    """One serialised ciphertext per slot vector (at ``scale``, default the context's)."""
    if pool is not None:
        return pool.encrypt(slot_vectors, scale)
    return [_encrypt_one(ctx, v, scale) for v in slot_vectors]


# -- parallel encryption ------------------------------------------------------------------
# TenSEAL holds the GIL while it encrypts (measured: two threads run no faster than
# one), so parallel encryption needs processes. Each worker loads the public
# context once; tasks carry only slot values (8 B/slot) and return ciphertexts.

_WORKER_CTX: ts.Context | None = None


def _worker_init(public_context: bytes) -> None:
    global _WORKER_CTX
    _WORKER_CTX = load_context(public_context, require_secret=False)


def _worker_encrypt(batch: list[np.ndarray], scale: float | None) -> list[bytes]:
    assert _WORKER_CTX is not None, "worker not initialised"
    return [_encrypt_one(_WORKER_CTX, v, scale) for v in batch]


class EncryptionPool:
    """A process pool encrypting under one public context; reuse it across rounds."""

    def __init__(self, public_context: bytes, workers: int, *, batch: int = 8) -> None:
        if workers < 1 or batch < 1:
            raise CodecError("an encryption pool needs ≥ 1 worker and batch ≥ 1")
        import multiprocessing as mp

        self.workers = workers
        self.batch = batch
        # spawn: forking a process that holds TenSEAL/torch thread pools is unsafe.
        self._executor = ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(public_context,),
        )

    def encrypt(self, slot_vectors: Iterable[np.ndarray], scale: float | None) -> list[bytes]:
        """Ciphertexts in input order."""
        # Submit as batches fill, so the caller's quantisation overlaps encryption.
        futures = []
        batch: list[np.ndarray] = []
        for v in slot_vectors:
            batch.append(v)
            if len(batch) == self.batch:
                futures.append(self._executor.submit(_worker_encrypt, batch, scale))
                batch = []
        if batch:
            futures.append(self._executor.submit(_worker_encrypt, batch, scale))
        return [c for f in futures for c in f.result()]

    def close(self) -> None:
        """Stop the workers."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EncryptionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_chunk(
    ctx: ts.Context,
    data: bytes,
    preset: CKKSPreset,
    *,
    expected_len: int,
    levels: int | None = None,
    scale_bits: int | None = None,
) -> ts.CKKSVector:
    """Parse one serialised chunk and check it is a well-formed ciphertext of ``preset``.

    TenSEAL happily loads an empty byte string as a 0-slot vector and accepts
    ciphertexts of other parameter sets, so every structural property the
    aggregation relies on is checked here before use.
    """
    if not data or len(data) > preset.max_ciphertext_bytes:
        raise EnvelopeError(f"ciphertext chunk of {len(data)} bytes is empty or too large")
    try:
        vec = ts.ckks_vector_from(ctx, data)
        parts = vec.ciphertext()
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError
        raise EnvelopeError(f"cannot parse ciphertext chunk: {exc}") from None
    if len(parts) != 1 or vec.size() != expected_len:
        raise EnvelopeError(f"chunk holds {vec.size()} values, expected {expected_len}")
    ct = parts[0]
    want_levels = preset.fresh_levels if levels is None else levels
    want_scale = 2.0 ** (preset.scale_bits if scale_bits is None else scale_bits)
    if (
        ct.size() != 2
        or ct.poly_modulus_degree() != preset.poly_modulus_degree
        or ct.coeff_modulus_size() != want_levels
        or ct.is_transparent()
        or not math.isclose(ct.scale, want_scale, rel_tol=1e-3)
    ):
        raise EnvelopeError("chunk is not a fresh ciphertext of the agreed CKKS preset")
    return vec


def chunk_lengths(numel: int, slots: int) -> Sequence[int]:
    """Lengths of the chunks a vector of ``numel`` elements splits into."""
    full, rest = divmod(numel, slots)
    return [slots] * full + ([rest] if rest else [])


def decrypt_chunks(vectors: Sequence[ts.CKKSVector], numel: int) -> np.ndarray:
    """Decrypt chunk vectors (secret-key context) back into one flat vector."""
    out = np.empty(numel, dtype=np.float64)
    pos = 0
    for v in vectors:
        vals = np.asarray(v.decrypt(), dtype=np.float64)
        out[pos : pos + vals.shape[0]] = vals
        pos += vals.shape[0]
    if pos != numel:
        raise CodecError(f"decrypted {pos} values, expected {numel}")
    return out
