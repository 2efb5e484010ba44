"""Pairwise additive masks (the SecAgg+ idea) for packed integer slots, mod M.

Status: issue 16, deliverable 1, as a tested building block **not yet wired into the
protocol** (nothing calls it yet). A later change relays the signed keys in the round,
signs :func:`cohort_digest` into every update statement (so the key holder can check
that a manifest is exactly the masked cohort), adds :func:`client_mask` to the packed
slots before encryption and reduces the decrypted sum mod M.

Per (run, round, attempt), once the cohort is fixed, client i publishes a fresh X25519
key signed with its certificate key (:class:`SignedMaskKey`: the relaying aggregator
can neither substitute nor replay one), derives with each peer j a seed by X25519 +
HKDF-SHA256 bound to the round, both names and keys and the cohort (:func:`pair_seed`),
expands it with ChaCha20 into integers uniform in [0, M) (:func:`mask_stream`) and adds
Σ_j s_ij·mask_ij, s_ij = +1 if i < j else −1 (:func:`client_mask`, :func:`apply_mask`).
The masks cancel in the sum mod M; one upload alone is a one-time pad to anyone missing
one of its pair seeds: aggregator and key holder together see uniform values unless
all n − 1 peers of that client collude with them.

Dropouts: a masked sum missing a client cannot be unmasked; the intended policy is to
discard it and re-run the masking with the remaining cohort as a new ``attempt``
(fresh keys and seeds; ``attempt`` is in everything signed and derived).

Every primitive comes from ``cryptography`` (X25519, HKDF, ChaCha20, and the signatures
of :mod:`secure_xfl.crypto.pki`); our own code only rejection-samples uniform bits into
a uniform residue. Every refusal is a :class:`~secure_xfl.crypto.errors.MaskError` with
a ``reason`` in :data:`MASK_REASONS`. No torch is imported.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_xfl.crypto import pki
from secure_xfl.crypto.errors import MaskError

__all__ = [
    "MASK_KEY_VERSION", "MASK_REASONS", "MAX_MODULUS", "MaskKeyPair", "SignedMaskKey",
    "apply_mask", "client_mask", "cohort_digest", "mask_stream", "mask_throughput",
    "pair_seed",
]  # fmt: skip

Uint64Array = npt.NDArray[np.uint64]
#: Who can verify a signed key: a client certificate or its public key.
Signer = pki.PublicKey | x509.Certificate

MASK_KEY_TAG = "mask-key"
MASK_KEY_VERSION = 1
#: Domain tags: a signature, digest or seed of one kind can never be read as another.
MASK_KEY_DOMAIN = "secure-xfl/mask-key/v1"
COHORT_DOMAIN = b"secure-xfl/mask-cohort/v1\0"
SEED_DOMAIN = "secure-xfl/pair-seed/v1"
#: Largest modulus: values and masks < 2^62 add without overflowing uint64.
MAX_MODULUS = 1 << 62
MAX_MASK_LEN = 1 << 31
MAX_COHORT = 100_000
MAX_SIGNATURE_BYTES = 512
#: The ``reason`` of every :class:`MaskError` (described on the class).
MASK_REASONS: tuple[str, ...] = (
    "malformed", "bad_signature", "wrong_run", "wrong_round", "wrong_attempt",
    "wrong_client", "bad_key", "bad_cohort", "bad_request",
)  # fmt: skip

# ChaCha20 in ``cryptography`` takes a 16-byte nonce: 4-byte counter || 12-byte nonce.
# A fixed one is safe because every seed keys exactly one stream.
_NONCE = bytes(16)
#: Keystream is drawn in blocks of this many words (1 MiB) into reused buffers: fresh
#: multi-MiB buffers per stream cost more in page faults than ChaCha20 itself.
_BLOCK = 1 << 17
_ZEROS = memoryview(bytes(8 * _BLOCK))
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise MaskError("malformed", f"{name} must match {_ID_RE.pattern}")
    return value


def _check_int(value: object, name: str, lo: int = 0, hi: int = 2**31) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MaskError("malformed", f"{name} must be an integer in [{lo}, {hi}]")
    return value


def _check_bytes(value: object, name: str, lo: int, hi: int) -> bytes:
    if not isinstance(value, bytes) or not lo <= len(value) <= hi:
        raise MaskError("malformed", f"{name} must be {lo}..{hi} bytes")
    return value


def _check_context(key: SignedMaskKey, run: str, round: int, attempt: int) -> None:
    """A replay from another run, round or attempt is refused (cheap, so checked first)."""
    got = {"run": key.run, "round": key.round, "attempt": key.attempt}
    want = {"run": run, "round": round, "attempt": attempt}
    for what in got:
        if got[what] != want[what]:
            raise MaskError(f"wrong_{what}", f"{key.client}: key of {what} {got[what]!r}")


def _exchange(own: X25519PrivateKey, raw: bytes, who: str) -> bytes:
    # A low-order point gives an all-zero shared secret, which OpenSSL refuses (ValueError).
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as exc:
        raise MaskError("bad_key", f"{who}: not a usable X25519 public key") from exc


@dataclass(frozen=True)
class MaskKeyPair:
    """One client's single-use X25519 key pair for one (run, round, attempt)."""

    private_key: X25519PrivateKey = field(repr=False)
    """Secret half; stays on the client and is dropped once the round's mask is built."""
    public_bytes: bytes
    """Raw 32-byte public half, as published in :class:`SignedMaskKey`."""

    @classmethod
    def generate(cls) -> MaskKeyPair:
        """A fresh key pair from the OS CSPRNG (through ``cryptography``)."""
        key = X25519PrivateKey.generate()
        return cls(key, key.public_key().public_bytes_raw())

    def sign(
        self, *, run: str, round: int, attempt: int, client: str, signing_key: pki.PrivateKey
    ) -> SignedMaskKey:
        """Publish the public half, signed with the client's certificate key."""
        sig = pki.sign(signing_key, _signing_bytes(run, round, attempt, client, self.public_bytes))
        return SignedMaskKey(run, round, attempt, client, self.public_bytes, sig)


def _signing_bytes(run: str, round: int, attempt: int, client: str, key: bytes) -> bytes:
    return bytes(
        msgpack.packb([MASK_KEY_DOMAIN, run, round, attempt, client, key], use_bin_type=True)
    )


@dataclass(frozen=True)
class SignedMaskKey:
    """A client's X25519 public key for one round, signed with its certificate key."""

    run: str
    """Run id the key is for."""
    round: int
    """Round the key is for; a key is never valid in another round."""
    attempt: int
    """Masking attempt within the round (a re-run after a dropout is a new attempt)."""
    client: str
    """The publishing client's name (its certificate's identity)."""
    public_key: bytes
    """Raw 32-byte X25519 public key."""
    signature: bytes
    """Signature by the client's certificate key over :meth:`signing_bytes`."""

    def __post_init__(self) -> None:
        _check_id(self.run, "run")
        _check_int(self.round, "round")
        _check_int(self.attempt, "attempt")
        _check_id(self.client, "client")
        _check_bytes(self.public_key, "public_key", 32, 32)
        _check_bytes(self.signature, "signature", 1, MAX_SIGNATURE_BYTES)

    def signing_bytes(self) -> bytes:
        """Canonical bytes covered by the signature (after the domain tag)."""
        return _signing_bytes(self.run, self.round, self.attempt, self.client, self.public_key)

    def to_wire(self) -> list[Any]:
        """Positional, msgpack-friendly form with a tag and version."""
        return [MASK_KEY_TAG, MASK_KEY_VERSION, *astuple(self)]

    @classmethod
    def from_wire(cls, obj: object) -> SignedMaskKey:
        """Strictly validate the positional form; any defect is a :class:`MaskError`."""
        if not isinstance(obj, list) or len(obj) != 8:
            raise MaskError("malformed", "signed mask key must be a list of 8 fields")
        if obj[0] != MASK_KEY_TAG or type(obj[1]) is not int or obj[1] != MASK_KEY_VERSION:
            raise MaskError("malformed", f"not a v{MASK_KEY_VERSION} signed mask key")
        return cls(*obj[2:])

    def verify(
        self, signer: Signer, *, run: str, round: int, attempt: int, client: str | None = None
    ) -> None:
        """Refuse a key of another run/round/attempt/client, a bad signature or a bad key.

        ``signer``: the certificate (or key) of the named client; ``client``: who is expected.
        """
        _check_context(self, run, round, attempt)
        if client is not None and self.client != client:
            raise MaskError("wrong_client", f"key names {self.client!r}, expected {client!r}")
        try:
            pki.verify_signature(signer, self.signature, self.signing_bytes())
        except (pki.SignatureInvalid, pki.PkiError) as exc:  # PkiError: unusable signer key
            raise MaskError("bad_signature", f"{self.client}: {exc}") from exc
        # A trial exchange with a throwaway key refuses a low-order key before any seed uses it.
        _exchange(X25519PrivateKey.generate(), self.public_key, self.client)


def cohort_digest(keys: Sequence[SignedMaskKey]) -> bytes:
    """SHA-256 over the signed content of the cohort's keys, sorted by client name.

    Signatures are left out: ECDSA ones are randomised and malleable, and what they
    cover (the round and every client's key) is what the digest must name. All keys
    must share one (run, round, attempt); names and keys must be distinct.
    """
    if not 2 <= len(keys) <= MAX_COHORT:
        raise MaskError("bad_cohort", f"a masked cohort has 2..{MAX_COHORT} clients")
    first = keys[0]
    for k in keys:
        _check_context(k, first.run, first.round, first.attempt)
    if len({k.client for k in keys}) != len(keys):
        raise MaskError("bad_cohort", "a client appears twice in the cohort")
    if len({k.public_key for k in keys}) != len(keys):
        raise MaskError("bad_cohort", "two clients publish the same key")
    h = hashlib.sha256(COHORT_DOMAIN)
    h.update(len(keys).to_bytes(8, "big"))
    for k in sorted(keys, key=lambda k: k.client):
        body = k.signing_bytes()
        h.update(len(body).to_bytes(8, "big"))
        h.update(body)
    return h.digest()


def pair_seed(
    own: MaskKeyPair,
    peer: SignedMaskKey,
    *,
    run: str,
    round: int,
    attempt: int,
    own_name: str,
    cohort_digest: bytes,
) -> bytes:
    """The 32-byte seed own_name shares with ``peer``: X25519, then HKDF-SHA256.

    The HKDF info names the run, round, attempt, both names (sorted) with their
    keys, and the cohort digest, so another round, attempt or cohort gives an
    unrelated seed even if a key pair were ever reused.
    """
    _check_context(peer, run, round, attempt)
    _check_id(own_name, "own_name")
    _check_bytes(cohort_digest, "cohort_digest", 32, 32)
    if peer.client == own_name:
        raise MaskError("bad_cohort", "a client has no pair seed with itself")
    if peer.public_key == own.public_bytes:
        raise MaskError("bad_key", f"{peer.client} publishes this client's own key")
    shared = _exchange(own.private_key, peer.public_key, peer.client)
    ends = sorted([(own_name, own.public_bytes), (peer.client, peer.public_key)])
    info = [SEED_DOMAIN, run, round, attempt, *ends[0], *ends[1], cohort_digest]
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=msgpack.packb(info))
    return hkdf.derive(shared)


def _check_modulus(modulus: object) -> int:
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= MAX_MODULUS:
        raise MaskError("bad_request", "modulus must be an int in [2, 2^62]")
    return modulus


def mask_stream(seed: bytes, n: int, modulus: int) -> Uint64Array:
    """``n`` integers uniform in [0, modulus) from the ChaCha20 keystream of ``seed``.

    Rejection sampling: each little-endian 64-bit keystream word is cut to
    k = bitlen(modulus − 1) bits and kept if < modulus (probability > 1/2), so every
    kept value is exactly uniform. Values come in keystream order, so a shorter
    stream is a prefix of a longer one with the same seed.
    """
    _check_bytes(seed, "seed", 32, 32)
    _check_int(n, "n", 0, MAX_MASK_LEN)
    _check_modulus(modulus)
    k = (modulus - 1).bit_length()
    cut, m = np.uint64((1 << k) - 1), np.uint64(modulus)
    enc = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    raw = bytearray(8 * _BLOCK + 64)  # update_into wants room for one more cipher block
    out = np.empty(n, dtype=np.uint64)
    have = 0
    while have < n:
        # Expected need (acceptance > 1/2) plus a margin, at most one cache-sized block.
        count = min(_BLOCK, 2 * (n - have) + 64)
        enc.update_into(_ZEROS[: 8 * count], raw)
        words = np.frombuffer(raw, dtype="<u8", count=count) & cut
        # np.compress is several times faster than boolean indexing here.
        kept = words if modulus == 1 << k else np.compress(words < m, words)
        take = min(n - have, kept.shape[0])
        out[have : have + take] = kept[:take]
        have += take
    return out


def _accumulate(acc: Uint64Array, x: Uint64Array, m: np.uint64, add: bool) -> None:
    # acc ← acc ± x mod m in place (both < m ≤ 2^62; x is scratch), branch-free: of
    # r = acc ± x (wrapped mod 2^64) and r ∓ m, one lies in [0, m), the other wrapped ≥ m.
    if add:
        np.add(acc, x, out=acc)
        np.subtract(acc, m, out=x)
    else:
        np.subtract(acc, x, out=acc)
        np.add(acc, m, out=x)
    np.minimum(acc, x, out=acc)


def client_mask(
    own: MaskKeyPair,
    cohort: Sequence[SignedMaskKey],
    *,
    n: int,
    modulus: int,
    run: str,
    round: int,
    attempt: int,
    own_name: str,
) -> Uint64Array:
    """Σ_j s_ij·mask_ij mod ``modulus`` over every peer j of the cohort (s_ij = ±1).

    ``cohort`` is the whole fixed cohort *including this client*, each key already
    checked with :meth:`SignedMaskKey.verify`; the digest is computed over it, and
    this client's own entry must carry its own public key (else the relay swapped it).
    """
    dig = cohort_digest(cohort)
    _check_int(n, "n", 0, MAX_MASK_LEN)
    m = np.uint64(_check_modulus(modulus))
    mine = [k for k in cohort if k.client == own_name]
    if not mine:
        raise MaskError("bad_cohort", f"{own_name!r} is not in the cohort")
    if mine[0].public_key != own.public_bytes:
        raise MaskError("bad_key", "the cohort names another key for this client")
    acc = np.zeros(n, dtype=np.uint64)
    for peer in cohort:
        if peer.client == own_name:
            continue
        seed = pair_seed(
            own, peer, run=run, round=round, attempt=attempt, own_name=own_name, cohort_digest=dig
        )
        _accumulate(acc, mask_stream(seed, n, modulus), m, add=own_name < peer.client)
    return acc


def _check_residues(a: object, name: str, modulus: int) -> Uint64Array:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != 1:
        raise MaskError("bad_request", f"{name} must be a 1-D uint64 array")
    if a.size and int(a.max()) >= modulus:
        raise MaskError("bad_request", f"{name} has values ≥ the modulus")
    return a


def apply_mask(values: Uint64Array, mask: Uint64Array, modulus: int) -> Uint64Array:
    """(values + mask) mod ``modulus``, both < modulus ≤ 2^62, as a new array."""
    _check_modulus(modulus)
    v = _check_residues(values, "values", modulus)
    x = _check_residues(mask, "mask", modulus)
    if v.shape != x.shape:
        raise MaskError("bad_request", f"values {v.shape} and mask {x.shape} differ in length")
    out = v + x  # < 2m: reduce as in _accumulate
    np.minimum(out, out - np.uint64(modulus), out=out)
    return out


#: A BFV-like plain modulus: the first prime ≡ 1 (mod 8192) above 2^39, the worst case
#: (rejection rate ≈ 1/2) for 3 × 13-bit lanes.
BFV_LIKE_MODULUS = 549_755_904_001


def mask_throughput(
    numel: int = 1_000_000,
    cohorts: Sequence[int] = (3, 8),
    moduli: Sequence[int] = (1 << 39, BFV_LIKE_MODULUS),
    repeats: int = 3,
) -> list[dict[str, float]]:
    """One client's :func:`client_mask` + :func:`apply_mask`, best of ``repeats``: rows of
    clients, modulus, numel, cpu_s (process CPU: it runs single-threaded), params_per_s."""
    rows: list[dict[str, float]] = []
    signer = ed25519.Ed25519PrivateKey.generate()
    at: dict[str, Any] = {"run": "bench", "round": 0, "attempt": 0}
    values = np.zeros(numel, dtype=np.uint64)
    for size, modulus in itertools.product(cohorts, moduli):
        pairs = {f"c{i}": MaskKeyPair.generate() for i in range(size)}
        keys = [p.sign(client=c, signing_key=signer, **at) for c, p in pairs.items()]
        best = float("inf")
        for _ in range(repeats):
            c0 = time.process_time()
            mask = client_mask(pairs["c0"], keys, n=numel, modulus=modulus, own_name="c0", **at)
            apply_mask(values, mask, modulus)
            best = max(min(best, time.process_time() - c0), 1e-9)
        rows.append(dict(clients=size, modulus=modulus, numel=numel, cpu_s=best))
        rows[-1]["params_per_s"] = numel / best
    return rows
