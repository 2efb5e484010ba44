"""BFV lane preset beside packed CKKS (``xfl-packed``) and ``nvflare-default``, one core.

The unmasked half of ``secure-xfl bench --sections he`` (:mod:`secure_xfl.bench.he`
adds the plaintext baseline and the masked cohorts, reusing :class:`System`);
:func:`bfv_rows` gives the same figures as report rows on their own. All three
systems are measured the same way in the same process, on the crypto core only, so
the figures isolate the scheme:

* **protect**: clip + noise (``privatize``) + quantise/pack (packed systems) +
  encrypt + serialise. The envelope's digest and signature, identical for all
  systems, are left out.
* **ingest**: parse each client's serialised ciphertexts and add them into a
  running sum (what the aggregator does per update; no envelope, no signature).
* **decrypt**: decrypt the summed ciphertexts and unpack/dequantise (packed).

TenSEAL contexts are loaded with ``n_threads=1``; run the measurement with
``OMP_NUM_THREADS=1 taskset -c 0`` for a strictly single-core figure.
Throughputs are the best of ``repeats`` runs (the machine may be shared).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from secure_xfl.bench.report import Row, row
from secure_xfl.bench.report import best_of as _best
from secure_xfl.crypto.bfv import (
    BFVLayout,
    BFVSum,
    decrypt_unpack_bfv,
    encrypt_bfv,
    generate_bfv_context,
    get_bfv_preset,
    pack_bfv,
)
from secure_xfl.crypto.codec import chunk_lengths, encrypt_slots, encrypt_vector, load_chunk
from secure_xfl.crypto.context import (
    CKKSPreset,
    generate_context,
    get_preset,
    public_context_bytes,
    secret_context_bytes,
)
from secure_xfl.crypto.packing import QuantSpec, pack_chunks, unpack_vector
from secure_xfl.privacy.dp import DPConfig, privatize

BFV = "bfv-lanes"
PACKED = "xfl-packed"
BASELINE = "nvflare-default"


@dataclass(frozen=True)
class BFVBenchConfig:
    """Sizes and DP settings of the BFV comparison."""

    numel: int = 1 << 20
    """Parameters per update."""
    clients: tuple[int, ...] = (3, 8)
    """Cohort sizes for the ingest figure (each ≤ ``max_clients``)."""
    max_clients: int = 8
    """Headroom of the quantiser shared by both packed systems."""
    clip_norm: float = 1.0
    """DP clip norm C."""
    noise_multiplier: float = 1.0
    """DP σ."""
    min_clients: int = 3
    """K: the smallest cohort (noise per client σC/√K)."""
    repeats: int = 2
    """Timed runs per throughput figure (the best counts)."""
    bfv_preset: str = BFV
    """Which BFV preset to measure."""


@dataclass
class Measured:
    """One system's figures."""

    bytes_per_param: float = 0.0
    protect: float = 0.0
    ingest: dict[int, float] | None = None
    decrypt: float = 0.0
    error_ratio: float = 0.0


class System:
    """Encrypt / sum / decrypt adapters for one scheme (contexts made once)."""

    def __init__(self, name: str, quant: QuantSpec, numel: int) -> None:
        self.name, self.quant, self.numel = name, quant, numel
        self.bfv: BFVLayout | None = None
        self.ckks: CKKSPreset | None = None
        if name.startswith("bfv"):
            self.bfv = get_bfv_preset(name).layout(quant)
            made = generate_bfv_context(self.bfv, n_threads=1)
        else:
            self.ckks = get_preset(name)
            made = generate_context(self.ckks)
        # Reload both with one thread, the public one from its public form.
        self.secret = ts.context_from(secret_context_bytes(made), n_threads=1)
        self.public = ts.context_from(public_context_bytes(made), n_threads=1)

    def _lengths(self) -> list[int]:
        if self.bfv is not None:
            return self.bfv.chunk_slots(self.numel)
        assert self.ckks is not None
        if self.ckks.packed:
            return self.quant.chunk_slots(self.numel, self.ckks.slots)
        return list(chunk_lengths(self.numel, self.ckks.slots))

    def protect(self, y: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        """Encode and encrypt an already privatised vector."""
        if self.bfv is not None:
            return encrypt_bfv(self.public, pack_bfv(y, self.bfv, rng), self.bfv)
        assert self.ckks is not None
        if self.ckks.packed:
            packed = pack_chunks(y, self.quant, self.ckks.slots, rng)
            return encrypt_slots(self.public, packed, scale=2.0**self.quant.scale_bits)
        return encrypt_vector(self.public, y, self.ckks)

    def ingest(self, uploads: list[list[bytes]]) -> list[bytes]:
        """Parse and add every upload into a running sum; the serialised sum."""
        if self.bfv is not None:
            acc = BFVSum(self.public, self.bfv, self.numel)
            for up in uploads:
                acc.add(up)
            return acc.result()
        assert self.ckks is not None
        scale = self.quant.scale_bits if self.ckks.packed else None
        total: list[Any] | None = None
        for up in uploads:
            vecs = [
                load_chunk(self.public, c, self.ckks, expected_len=n, scale_bits=scale)
                for c, n in zip(up, self._lengths(), strict=True)
            ]
            if total is None:
                total = vecs
            else:
                for a, v in zip(total, vecs, strict=True):
                    a.add_(v)
        assert total is not None
        return [bytes(v.serialize()) for v in total]

    def decrypt(self, agg: list[bytes], n: int) -> np.ndarray:
        """Decrypt (and unpack) a sum of ``n`` updates."""
        if self.bfv is not None:
            return decrypt_unpack_bfv(self.secret, agg, self.bfv, n, self.numel)
        assert self.ckks is not None
        vals = [np.asarray(ts.ckks_vector_from(self.secret, c).decrypt()) for c in agg]
        if self.ckks.packed:
            return unpack_vector(vals, self.quant, n, self.numel, self.ckks.slots)
        return np.concatenate(vals)


def bench_dp(cfg: BFVBenchConfig) -> DPConfig:
    """The DP settings every system of the comparison is measured with."""
    return DPConfig(
        clip_norm=cfg.clip_norm, noise_multiplier=cfg.noise_multiplier, min_clients=cfg.min_clients
    )


def make_system(name: str, cfg: BFVBenchConfig) -> System:
    """One system's contexts and quantiser, made once (key generation takes seconds)."""
    return System(name, QuantSpec.for_dp(bench_dp(cfg), max_clients=cfg.max_clients), cfg.numel)


def measure(name: str, cfg: BFVBenchConfig, system: System | None = None) -> Measured:
    """All figures of one system (``system``: reuse contexts already made for ``name``)."""
    dp = bench_dp(cfg)
    system = system or make_system(name, cfg)
    data = np.random.default_rng(7)
    xs = [data.normal(scale=0.01, size=cfg.numel) for _ in range(3)]
    ys: list[np.ndarray] = []
    uploads: list[list[bytes]] = []
    best = math.inf
    for _ in range(max(1, cfg.repeats)):
        ys, uploads = [], []
        for i, x in enumerate(xs):  # each client's protect is one timed sample
            start = time.perf_counter()
            y = privatize(x, dp, rng=np.random.default_rng(100 + i))
            uploads.append(system.protect(y, np.random.default_rng(200 + i)))
            best = min(best, time.perf_counter() - start)
            ys.append(y)
    m = Measured(protect=cfg.numel / best)
    m.bytes_per_param = sum(len(c) for c in uploads[0]) / cfg.numel
    m.ingest = {}
    for n in cfg.clients:
        cohort = [uploads[i % len(uploads)] for i in range(n)]  # same bytes, fresh parses
        t, _ = _best(functools.partial(system.ingest, cohort), cfg.repeats)
        m.ingest[n] = n * cfg.numel / t
    agg = system.ingest(uploads)
    t, got = _best(lambda: system.decrypt(agg, len(uploads)), cfg.repeats)
    m.decrypt = cfg.numel / t
    noise = dp.client_noise_std * math.sqrt(len(ys))  # DP noise std of the sum
    m.error_ratio = float(np.sqrt(np.mean((got - np.sum(ys, axis=0)) ** 2)) / noise)
    return m


def bfv_rows(cfg: BFVBenchConfig | None = None) -> list[Row]:
    """Rows: the BFV preset against packed CKKS and against NVFlare-default CKKS."""
    cfg = cfg or BFVBenchConfig()
    got = {name: measure(name, cfg) for name in (cfg.bfv_preset, PACKED, BASELINE)}
    size = f"{cfg.numel / 1e6:.3g} M params"
    rows: list[Row] = []
    ours = got[cfg.bfv_preset]
    for base in (PACKED, BASELINE):
        b = got[base]
        tag = f"[{cfg.bfv_preset} vs {base}]"
        rows.append(
            row(f"wire bytes/param {tag}", "B/param", ours.bytes_per_param, b.bytes_per_param)
        )
        rows.append(row(f"protect, 1 core, {size} {tag}", "params/s", ours.protect, b.protect))
        assert ours.ingest is not None and b.ingest is not None
        for n in cfg.clients:
            rows.append(
                row(
                    f"ciphertext-sum ingest, {n} clients, 1 core, {size} {tag}",
                    "params/s",
                    ours.ingest[n],
                    b.ingest[n],
                )
            )
        rows.append(
            row(
                f"decrypt + unpack, 3 clients, 1 core, {size} {tag}",
                "params/s",
                ours.decrypt,
                b.decrypt,
            )
        )
        rows.append(
            row(
                f"sum RMS error / DP noise std, 3 clients {tag}",
                "ratio",
                ours.error_ratio,
                b.error_ratio,
            )
        )
    return rows


if __name__ == "__main__":  # python -m secure_xfl.bench.bfv [numel]
    import sys

    from secure_xfl.bench.report import markdown

    numel = int(sys.argv[1]) if len(sys.argv) > 1 else BFVBenchConfig.numel
    print(markdown(bfv_rows(BFVBenchConfig(numel=numel))))
