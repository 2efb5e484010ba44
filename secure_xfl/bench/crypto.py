"""Crypto figures: ours (project default and packed path) vs NVFlare-default CKKS and fp32.

Every system protects the same clipped + noised updates (same DP settings),
the aggregator side verifies, deserialises and accumulates them, and the key
holder decrypts the aggregate. Ingest and its peak memory are measured in a
fresh ``spawn`` process per (system, clients) so the RSS high-water mark is
the ingest's own. Throughputs are the best of ``repeats`` runs: the machine
may be shared, and the best run is the least disturbed one.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.bench.report import Row, row
from secure_xfl.bench.report import best_of as _best
from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import EncryptionPool, TensorLayout, TensorSpec
from secure_xfl.crypto.context import (
    DEFAULT_PRESET,
    generate_context,
    get_preset,
    load_context,
    public_context_bytes,
)
from secure_xfl.crypto.envelope import ProtectedUpdate, SignedStatement, Weighting
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.pki import sign
from secure_xfl.privacy.dp import DPConfig, privatize
from secure_xfl.privacy.protect import protect_vector

RUN = "bench"
BASELINE = "nvflare-default"
PACKED = "xfl-packed"
PLAIN = "plaintext fp32"


@dataclass(frozen=True)
class CryptoBenchConfig:
    """Sizes and DP settings of the crypto benchmarks."""

    numel: int = 1 << 18
    """Parameters per update (protect, ingest, decrypt, error)."""
    clients: tuple[int, ...] = (3, 10, 50)
    """Cohort sizes for the ingest and peak-memory figures."""
    clip_norm: float = 1.0
    """DP clip norm C."""
    noise_multiplier: float = 1.0
    """DP σ."""
    min_clients: int = 3
    """K: the smallest cohort (noise per client σC/√K)."""
    repeats: int = 2
    """Timed runs per throughput figure (the best counts)."""
    workers: int = 0
    """Encryption processes for the all-cores figure (0: one per core)."""


@dataclass(frozen=True)
class _System:
    preset: str
    weighting: Weighting

    @property
    def packed(self) -> bool:
        return self.preset != PLAIN and get_preset(self.preset).packed


_OURS = (_System(DEFAULT_PRESET, "client"), _System(PACKED, "client"))
_BASE = _System(BASELINE, "aggregator")
#: Public per-client weights: FedAvg sample counts for the aggregator-side baseline,
#: the same counts over a public cap of 100 for client-side pre-weighting.
_SAMPLES = (100.0, 50.0, 75.0)
_CAP = 100.0


def _dp(cfg: CryptoBenchConfig) -> DPConfig:
    return DPConfig(
        clip_norm=cfg.clip_norm, noise_multiplier=cfg.noise_multiplier, min_clients=cfg.min_clients
    )


def _layout(numel: int) -> TensorLayout:
    return TensorLayout((TensorSpec("weight", (numel,), "float32"),))


def _updates(numel: int, n: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(7)
    for _ in range(n):
        yield rng.normal(scale=0.01, size=numel)


def _quant(system: _System, dp: DPConfig, max_clients: int) -> QuantSpec | None:
    return QuantSpec.for_dp(dp, max_clients=max_clients) if system.packed else None


def _max_clients_for(n: int) -> int:
    return max(4, 1 << math.ceil(math.log2(n)))


# ---------------------------------------------------------------------------- one system


@dataclass
class _Measured:
    bytes_per_param: float = 0.0
    protect_1: float = 0.0
    protect_all: float = 0.0
    decrypt: float = 0.0
    error_ratio: float = 0.0
    ingest: dict[int, tuple[float, float]] | None = None
    lanes: int = 1


def _protect(
    system: _System,
    x: np.ndarray,
    i: int,
    ctx: Any,
    dp: DPConfig,
    key: Any,
    pool: EncryptionPool | None = None,
    *,
    quant: QuantSpec | None,
) -> ProtectedUpdate:
    client_side = system.weighting == "client"
    return protect_vector(
        x,
        ctx=ctx,
        preset=get_preset(system.preset),
        layout=_layout(x.shape[0]),
        run=RUN,
        round=0,
        client=f"c{i}",
        signing_key=key,
        weight=_SAMPLES[i] / _CAP if client_side else _SAMPLES[i],
        weighting=system.weighting,
        dp=dp,
        rng=np.random.default_rng(100 + i),
        quant=quant,
        pool=pool,
    )


def _measure(system: _System, cfg: CryptoBenchConfig, workers: int) -> _Measured:
    preset = get_preset(system.preset)
    secret = generate_context(preset)
    pub_bytes = public_context_bytes(secret)
    public = load_context(pub_bytes, require_secret=False)
    dp = _dp(cfg)
    quant = _quant(system, dp, _max_clients_for(3))
    key = ec.generate_private_key(ec.SECP256R1())
    xs = list(_updates(cfg.numel, 3))
    m = _Measured(lanes=quant.lanes if quant else 1)
    ups: list[ProtectedUpdate] = []
    best = math.inf
    for i, x in enumerate(xs):  # three clients' updates: each one is a timed protect
        start = time.perf_counter()
        ups.append(_protect(system, x, i, public, dp, key, quant=quant))
        best = min(best, time.perf_counter() - start)
    m.protect_1 = cfg.numel / best
    m.bytes_per_param = len(ups[0].encode()) / cfg.numel
    with EncryptionPool(pub_bytes, workers) as pool:
        _protect(system, xs[0], 0, public, dp, key, pool, quant=quant)  # start the workers
        t, _ = _best(
            lambda: _protect(system, xs[0], 0, public, dp, key, pool, quant=quant), cfg.repeats
        )
    m.protect_all = cfg.numel / t
    acc = Accumulator(
        ctx=public,
        preset=preset,
        run=RUN,
        round=0,
        layout_digest=_layout(cfg.numel).digest,
        numel=cfg.numel,
        key_for=lambda _name: key.public_key(),
        weighting=system.weighting,
        weight_scale=_CAP if system.weighting == "aggregator" else 1.0,
    )
    for up in ups:
        acc.add(up.encode())
    agg = acc.result().encode()
    with tempfile.TemporaryDirectory() as tmp:
        holder = KeyHolder(
            ctx=secret,
            preset=preset,
            policy=KeyHolderPolicy(run=RUN, min_clients=3),
            client_keys={f"c{i}": key.public_key() for i in range(3)},
            state_dir=Path(tmp),
        )
        t, out = _best(lambda: holder.decrypt(agg), 1)
        holder.close()
    m.decrypt = cfg.numel / t
    m.error_ratio = _error_ratio(system, xs, dp, out.vector)
    return m


def _error_ratio(system: _System, xs: list[np.ndarray], dp: DPConfig, got: np.ndarray) -> float:
    """RMS error of the released average over the std of its DP noise."""
    s = dp.client_noise_std
    if system.weighting == "client":
        w = [_SAMPLES[i] / _CAP for i in range(len(xs))]
        ys = [
            privatize(x, dp, weight=w[i], rng=np.random.default_rng(100 + i))
            for i, x in enumerate(xs)
        ]
        exact = sum(ys) / sum(w)
        noise = s * math.sqrt(len(xs)) / sum(w)
    else:
        a = [_SAMPLES[i] / _CAP for i in range(len(xs))]
        ys = [privatize(x, dp, rng=np.random.default_rng(100 + i)) for i, x in enumerate(xs)]
        exact = sum(ai * y for ai, y in zip(a, ys, strict=True)) / sum(a)
        noise = s * math.sqrt(sum(ai * ai for ai in a)) / sum(a)
    return float(np.sqrt(np.mean((got - exact) ** 2)) / noise)


# ---------------------------------------------------------------------------- ingest child


def _rss_mb() -> float:
    """Current resident set size (the high-water mark would include the setup's peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _plain_ingest(numel: int, n: int, dp: DPConfig) -> tuple[float, float]:
    blob = privatize(next(_updates(numel, 1)), dp).astype(np.float32).tobytes()
    acc = np.zeros(numel, dtype=np.float64)
    before = peak = _rss_mb()
    busy = 0.0
    for _ in range(n):
        received = bytes(bytearray(blob))  # a fresh buffer per client, as off the wire
        start = time.perf_counter()
        acc += np.frombuffer(received, dtype=np.float32)
        busy += time.perf_counter() - start
        peak = max(peak, _rss_mb())
        del received
    return n * numel / busy, peak - before


def _ingest_child(
    args: tuple[str, Weighting, int, int, dict[str, Any], bytes, bytes, bytes], out: Any
) -> None:
    preset_name, weighting, numel, n, dpd, pub_bytes, key_der, template_blob = args
    if preset_name == PLAIN:
        out.put(_plain_ingest(numel, n, DPConfig(**dpd)))
        return
    preset = get_preset(preset_name)
    public = load_context(pub_bytes, require_secret=False)
    key = serialization.load_der_private_key(key_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    template = ProtectedUpdate.decode(template_blob)
    del template_blob
    acc = Accumulator(
        ctx=public,
        preset=preset,
        run=RUN,
        round=0,
        layout_digest=_layout(numel).digest,
        numel=numel,
        key_for=lambda _name: key.public_key(),
        weighting=weighting,
        weight_scale=_CAP if weighting == "aggregator" else 1.0,
    )
    # Growth of the resident set over the setup (which holds one update's chunks),
    # sampled with each update in flight and after each add.
    before = peak = _rss_mb()
    busy = 0.0
    for i in range(n):
        # Client i's wire bytes: same ciphertexts, its own signed statement. Made one
        # at a time, so nothing but the running sum outlives an ingest.
        w = _SAMPLES[i % 3] / (_CAP if weighting == "client" else 1.0)
        st = replace(template.statement, client=f"c{i}", weight=w)
        blob = ProtectedUpdate(
            SignedStatement(st, sign(key, st.signing_bytes())), template.chunks
        ).encode()
        peak = max(peak, _rss_mb())
        start = time.perf_counter()
        acc.add(blob)
        busy += time.perf_counter() - start
        peak = max(peak, _rss_mb())
        del blob
    out.put((n * numel / busy, peak - before))


def _ingest(system: _System, cfg: CryptoBenchConfig, n: int) -> tuple[float, float]:
    dp = _dp(cfg)
    pub_bytes, key_der, blob = b"", b"", b""
    if system.preset != PLAIN:
        preset = get_preset(system.preset)
        pub_bytes = public_context_bytes(generate_context(preset))
        public = load_context(pub_bytes, require_secret=False)
        key = ec.generate_private_key(ec.SECP256R1())
        key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        quant = _quant(system, dp, _max_clients_for(n))
        x = next(_updates(cfg.numel, 1))
        blob = _protect(system, x, 0, public, dp, key, quant=quant).encode()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    dpd = {
        "clip_norm": cfg.clip_norm,
        "noise_multiplier": cfg.noise_multiplier,
        "min_clients": cfg.min_clients,
    }
    args = (system.preset, system.weighting, cfg.numel, n, dpd, pub_bytes, key_der, blob)
    proc = ctx.Process(target=_ingest_child, args=(args, q))
    proc.start()
    try:
        rate, mem = q.get(timeout=900)
    finally:
        proc.join(30)
    return float(rate), float(mem)


def _plain(cfg: CryptoBenchConfig) -> _Measured:
    """fp32 plaintext: clip + noise + cast + bytes; ingest = frombuffer + add."""
    dp = _dp(cfg)
    xs = list(_updates(cfg.numel, 3))
    t, blob = _best(
        lambda: privatize(xs[0], dp, rng=np.random.default_rng(1)).astype(np.float32).tobytes(),
        cfg.repeats,
    )
    m = _Measured(bytes_per_param=len(blob) / cfg.numel, protect_1=cfg.numel / t)
    m.protect_all = m.protect_1
    m.ingest = {n: _ingest(_System(PLAIN, "client"), cfg, n) for n in cfg.clients}
    got = np.frombuffer(blob, dtype=np.float32).astype(np.float64)
    exact = privatize(xs[0], dp, rng=np.random.default_rng(1))
    m.error_ratio = float(np.sqrt(np.mean((got - exact) ** 2)) / dp.client_noise_std)
    m.decrypt = math.inf
    return m


# ---------------------------------------------------------------------------- rows


def run(cfg: CryptoBenchConfig | None = None) -> list[Row]:
    """All crypto rows: each of our systems against NVFlare-default, packed against fp32."""
    cfg = cfg or CryptoBenchConfig()
    workers = cfg.workers or os.cpu_count() or 1
    systems = [*_OURS, _BASE]
    got: dict[str, _Measured] = {}
    for s in systems:
        m = _measure(s, cfg, workers)
        m.ingest = {n: _ingest(s, cfg, n) for n in cfg.clients}
        got[s.preset] = m
    got[PLAIN] = _plain(cfg)
    size = f"{cfg.numel / 1e6:.3g} M params"
    rows: list[Row] = []
    pairs = [(o.preset, BASELINE) for o in _OURS] + [(PACKED, PLAIN)]
    for ours, base in pairs:
        a, b = got[ours], got[base]
        tag = f"[{ours} vs {base}]"
        rows.append(row(f"wire bytes/param {tag}", "B/param", a.bytes_per_param, b.bytes_per_param))
        rows.append(row(f"protect, 1 core, {size} {tag}", "params/s", a.protect_1, b.protect_1))
        if base != PLAIN:
            rows.append(
                row(
                    f"protect, {workers} cores, {size} {tag}",
                    "params/s",
                    a.protect_all,
                    b.protect_all,
                )
            )
        assert a.ingest is not None and b.ingest is not None
        for n in cfg.clients:
            rows.append(
                row(
                    f"ingest, {n} clients, {size} {tag}", "params/s", a.ingest[n][0], b.ingest[n][0]
                )
            )
            rows.append(
                row(
                    f"ingest peak memory, {n} clients, {size} {tag}",
                    "MB",
                    a.ingest[n][1],
                    b.ingest[n][1],
                )
            )
        if base != PLAIN:
            rows.append(row(f"decrypt, 3 clients, {size} {tag}", "params/s", a.decrypt, b.decrypt))
        rows.append(
            row(
                f"aggregate RMS error / DP noise std, 3 clients {tag}",
                "ratio",
                a.error_ratio,
                b.error_ratio,
            )
        )
    return rows
