"""``secure-xfl bench --sections he``: every HE system of issue 16 side by side, one core.

One run measures, per system, for the same update size, quantiser, DP settings and
seeds (the crypto core only, as :mod:`secure_xfl.bench.bfv`: no envelope digest or
signature, identical for all systems):

* **wire bytes/param**: one client's serialised ciphertexts (plaintext: float32);
* **protect**: clip + noise, quantise + pack, *this client's pairwise masks for its
  cohort* (masked rows: X25519 exchanges, ChaCha20 streams, the sum mod M), encrypt,
  serialise: the best single client of every timed one;
* **ingest**: parse every upload of a cohort and add it into a running sum;
* **decrypt**: decrypt the sum, reduce it mod M (masked rows), unpack, dequantise.

Systems: plaintext (float32 upload, numpy sum into float64: the baseline),
``nvflare-default`` CKKS, ``xfl-packed`` CKKS unmasked and masked, ``bfv-lanes``
unmasked and masked, each masked one for every cohort size. A masked row is a real
cohort: every member has its own X25519 key pair (signed, as in a round), its own data
and mask, and the decrypted sum must equal the sum of the members' quantised levels
exactly, or the bench raises (a figure from a wrong computation is never printed).

TenSEAL contexts use one thread; pin the process too (the printed command does).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric import ed25519

from secure_xfl.bench.bfv import (
    BASELINE,
    BFV,
    PACKED,
    BFVBenchConfig,
    System,
    bench_dp,
    make_system,
    measure,
)
from secure_xfl.bench.report import Row, row
from secure_xfl.bench.report import best_of as _best
from secure_xfl.crypto.bfv import decrypt_bfv_slots, encrypt_bfv, pack_bfv, unpack_bfv
from secure_xfl.crypto.codec import encrypt_slots
from secure_xfl.crypto.cohort import CohortMask
from secure_xfl.crypto.masking import MaskKeyPair
from secure_xfl.crypto.packing import quantise, unpack_vector
from secure_xfl.crypto.protect import MASK_WRAP_LOG2_LIMIT, masked_slots
from secure_xfl.privacy.dp import privatize

PLAINTEXT = "plaintext fp32"
DEFAULT_NUMEL = 1_000_000
QUICK_NUMEL = 20_000  #: ``--quick``: seconds, for CI
#: How the recorded figures are reproduced (one core, one thread).
COMMAND = "OMP_NUM_THREADS=1 taskset -c 1 secure-xfl bench --sections he"


@dataclass(frozen=True)
class Goals:
    """Issue 16's targets for one row (``None``: no target)."""

    max_bytes: float | None = None
    """Most wire bytes per parameter."""
    min_protect: float | None = None
    """Fewest protect params/s per core, masks included."""
    min_ingest: float | None = None
    """Fewest ingest params/s (every cohort measured)."""
    min_decrypt: float | None = None
    """Fewest decrypt params/s."""

    def text(self) -> str:
        """The goal column."""
        parts = []
        if self.max_bytes is not None:
            parts.append(f"≤ {self.max_bytes:g} B")
        for name, x in (("P", self.min_protect), ("I", self.min_ingest), ("D", self.min_decrypt)):
            if x is not None:
                parts.append(f"{name} ≥ {x / 1e6:g} M")
        return ", ".join(parts) or "—"


OURS = Goals(min_ingest=50e6, min_decrypt=20e6)
GOALS: dict[tuple[str, bool], Goals] = {
    (PACKED, False): OURS,
    (PACKED, True): dataclasses.replace(OURS, max_bytes=10.8),
    (BFV, False): dataclasses.replace(OURS, max_bytes=5.5, min_protect=6e6),
    (BFV, True): dataclasses.replace(OURS, max_bytes=5.5, min_protect=6e6),
}


@dataclass(frozen=True)
class HEBenchConfig:
    """Sizes and DP settings of the side-by-side comparison."""

    numel: int = DEFAULT_NUMEL
    """Parameters per update."""
    cohorts: tuple[int, ...] = (3, 8)
    """Cohort sizes: ingest of every system, and one masked row per size (≤ max_clients)."""
    max_clients: int = 8
    """Headroom of the quantiser shared by every packed system."""
    repeats: int = 3
    """Timed runs per throughput figure (the best counts: the machine may be shared)."""

    def bfv_config(self) -> BFVBenchConfig:
        """The same sizes for :mod:`secure_xfl.bench.bfv`'s unmasked measurements."""
        return BFVBenchConfig(
            numel=self.numel,
            clients=self.cohorts,
            max_clients=self.max_clients,
            repeats=self.repeats,
        )


@dataclass
class SystemResult:
    """One row of the table."""

    system: str
    """Scheme (preset name, or :data:`PLAINTEXT`)."""
    masked: bool
    """Pairwise masks on (then ``ingest`` has the one cohort it was masked for)."""
    bytes_per_param: float
    """Serialised upload bytes per parameter."""
    protect: float
    """Protect params/s, one core, masks included."""
    ingest: dict[int, float]
    """Cohort size → ingest params/s (all updates' parameters over the time)."""
    decrypt: float | None
    """Decrypt + unmask + unpack params/s (``None``: plaintext has none)."""
    decrypt_clients: int
    """Updates in the decrypted sum."""
    goals: Goals | None = None
    """Targets (``None``: a reference row)."""
    misses: list[str] = field(default_factory=list)
    """Each goal missed, with by how much."""

    @property
    def label(self) -> str:
        """Name in the table and the rows."""
        if self.masked:
            return f"{self.system} masked, cohort {self.decrypt_clients}"
        return self.system

    def check_goals(self) -> None:
        """Fill :attr:`misses` from :attr:`goals`."""
        g, self.misses = self.goals, []
        if g is None:
            return
        if g.max_bytes is not None and self.bytes_per_param > g.max_bytes:
            self.misses.append(f"bytes {self.bytes_per_param / g.max_bytes - 1:+.0%}")
        worst_ingest = min(self.ingest.values())
        for name, got, want in (
            ("protect", self.protect, g.min_protect),
            ("ingest", worst_ingest, g.min_ingest),
            ("decrypt", self.decrypt, g.min_decrypt),
        ):
            if want is not None and (got is None or got < want):
                self.misses.append(f"{name} {(got or 0.0) / 1e6:.3g} M < {want / 1e6:g} M")


@dataclass
class HEResult:
    """Every system's figures, in table order."""

    cfg: HEBenchConfig
    """What was measured."""
    systems: list[SystemResult]
    """Rows: plaintext, nvflare-default, xfl-packed (± masks), bfv-lanes (± masks)."""

    def command(self) -> str:
        """The command that reproduces these figures."""
        cmd, quick = COMMAND, self.cfg.repeats == 1  # only --quick times once
        if quick:
            cmd += " --quick"
        if self.cfg.numel != (QUICK_NUMEL if quick else DEFAULT_NUMEL):
            cmd += f" --he-numel {self.cfg.numel}"
        if self.cfg.cohorts != ((3,) if quick else HEBenchConfig.cohorts):
            cmd += " --he-clients " + ",".join(map(str, self.cfg.cohorts))
        return cmd

    def table(self) -> str:
        """Side-by-side markdown table, goals and misses, and the reproducing command."""
        cohorts = " / ".join(map(str, self.cfg.cohorts))
        lines = [
            "| system | B/param | protect M/s | ingest M/s (cohort) | decrypt M/s | goal | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.systems:
            ingest = " / ".join(f"{v / 1e6:.3g}" for v in s.ingest.values())
            who = str(s.decrypt_clients) if s.masked else cohorts
            dec = "—" if s.decrypt is None else f"{s.decrypt / 1e6:.3g}"
            goal = "baseline" if s.system == PLAINTEXT else (s.goals or Goals()).text()
            met = (
                "—"
                if s.goals is None
                else ("yes" if not s.misses else "no: " + "; ".join(s.misses))
            )
            lines.append(
                f"| {s.label} | {s.bytes_per_param:.3f} | {s.protect / 1e6:.3g} | {ingest} ({who}) "
                f"| {dec} | {goal} | {met} |"
            )
        lines += [
            "",
            f"{self.cfg.numel:,} params per update, one core, best of {self.cfg.repeats}; "
            "goal: P protect (masks included), I ingest, D decrypt (params/s). "
            "Masked sums checked equal to the members' summed quantised levels.",
            f"Reproduce: `{self.command()}`",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Sidecar JSON (goals and misses included)."""
        return {
            "config": dataclasses.asdict(self.cfg),
            "command": self.command(),
            "systems": [{**dataclasses.asdict(s), "label": s.label} for s in self.systems],
        }


def _inputs(cfg: HEBenchConfig, n: int) -> list[np.ndarray]:
    data = np.random.default_rng(7)  # the first 3 equal bench.bfv's inputs
    return [data.normal(scale=0.01, size=cfg.numel) for _ in range(n)]


def measure_plaintext(cfg: HEBenchConfig) -> SystemResult:
    """The baseline: privatise, upload float32, sum with numpy (no decryption)."""
    dp = bench_dp(cfg.bfv_config())
    best, uploads = math.inf, list[bytes]()
    for _ in range(max(1, cfg.repeats)):
        uploads = []
        for i, x in enumerate(_inputs(cfg, 3)):
            start = time.perf_counter()
            y = privatize(x, dp, rng=np.random.default_rng(100 + i))
            uploads.append(y.astype(np.float32).tobytes())
            best = min(best, time.perf_counter() - start)

    def ingest(cohort: Sequence[bytes]) -> np.ndarray:
        acc = np.zeros(cfg.numel, dtype=np.float64)
        for up in cohort:
            acc += np.frombuffer(up, dtype=np.float32)
        return acc

    speeds = {}
    for n in cfg.cohorts:
        cohort = [uploads[i % 3] for i in range(n)]  # same bytes, fresh parses
        t, _ = _best(functools.partial(ingest, cohort), cfg.repeats)
        speeds[n] = n * cfg.numel / t
    return SystemResult(
        PLAINTEXT, False, len(uploads[0]) / cfg.numel, cfg.numel / best, speeds, None, 3
    )


def cohort_masks(n: int, run: str = "bench", round: int = 0, epoch: int = 0) -> list[CohortMask]:
    """A cohort of ``n`` members ``c0 …``, each with its own key pair, keys signed."""
    signer = ed25519.Ed25519PrivateKey.generate()
    names = [f"c{i}" for i in range(n)]
    pairs = {c: MaskKeyPair.generate() for c in names}
    keys = tuple(
        pairs[c].sign(run=run, round=round, attempt=epoch, client=c, signing_key=signer)
        for c in names  # already sorted by name for n ≤ 10; sorted below regardless
    )
    keys = tuple(sorted(keys, key=lambda k: k.client))
    return [CohortMask(run, round, epoch, c, pairs[c], keys) for c in names]


def protect_masked(
    s: System, y: np.ndarray, rng: np.random.Generator, mask: CohortMask
) -> list[bytes]:
    """Quantise + pack, add this client's masks mod M, encrypt, serialise."""
    if s.bfv is not None:
        modulus = s.bfv.mask_modulus
        slots = pack_bfv(y, s.bfv, rng)
        stream = mask.mask(sum(c.shape[0] for c in slots), modulus)
        out, pos, m = [], 0, np.uint64(modulus)
        for c in slots:
            v = stream[pos : pos + c.shape[0]] + c.astype(np.uint64)  # both < M ≤ 2^62
            np.minimum(v, v - m, out=v)  # mod M: < M ≤ t / max_clients, so no wrap mod t
            out.append(v.astype(np.int64))
            pos += c.shape[0]
        return encrypt_bfv(s.public, out, s.bfv)
    assert s.ckks is not None
    packed = masked_slots(y, s.quant, s.ckks.slots, rng, mask)
    return encrypt_slots(s.public, packed, scale=2.0**s.quant.scale_bits)


def decrypt_masked(s: System, agg: list[bytes], n: int) -> np.ndarray:
    """Decrypt a masked sum of ``n``, reduce mod M (the masks cancel), unpack."""
    if s.bfv is not None:
        slots = decrypt_bfv_slots(s.secret, agg, s.bfv, s.numel)  # Σ < n·M ≤ t: no wrap
        return unpack_bfv([v % s.bfv.mask_modulus for v in slots], s.bfv, n, s.numel)
    assert s.ckks is not None
    vals = [np.asarray(ts.ckks_vector_from(s.secret, c).decrypt()) for c in agg]
    return unpack_vector(vals, s.quant, n, s.numel, s.ckks.slots, masked=True)


def _levels(s: System, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The quantised levels protect drew with an identically seeded ``rng``."""
    if s.bfv is not None:  # pack_bfv quantises the whole vector at once
        return quantise(y, s.quant, rng)
    assert s.ckks is not None  # masked_slots quantises chunk by chunk, in order
    bounds = np.cumsum([0, *s.quant.chunk_params(s.numel, s.ckks.slots)])
    return np.concatenate([quantise(y[a:b], s.quant, rng) for a, b in itertools.pairwise(bounds)])


def measure_masked(s: System, cfg: HEBenchConfig, n: int) -> SystemResult:
    """One masked cohort of ``n`` real members: protect each, ingest all, decrypt, check."""
    if s.ckks is not None:  # seal_vector's rule: a masked CKKS sum must not wrap
        wrap = s.quant.masked_wrap_log2(s.ckks.poly_modulus_degree, n)
        if wrap > MASK_WRAP_LOG2_LIMIT:
            raise AssertionError(f"a masked sum of {n} wraps with probability 2^{wrap:.0f}")
    dp = bench_dp(cfg.bfv_config())
    masks = cohort_masks(n)
    best = math.inf
    uploads: list[list[bytes]] = []
    ys: list[np.ndarray] = []
    for _ in range(max(1, cfg.repeats)):
        uploads, ys = [], []
        for i, x in enumerate(_inputs(cfg, n)):  # each member's protect is one sample
            start = time.perf_counter()
            y = privatize(x, dp, rng=np.random.default_rng(100 + i))
            uploads.append(protect_masked(s, y, np.random.default_rng(200 + i), masks[i]))
            best = min(best, time.perf_counter() - start)
            ys.append(y)
    t, agg = _best(lambda: s.ingest(uploads), cfg.repeats)
    ingest = {n: n * cfg.numel / t}
    t, got = _best(lambda: decrypt_masked(s, agg, n), cfg.repeats)
    levels = np.zeros(cfg.numel, dtype=np.int64)
    for i, y in enumerate(ys):
        levels += _levels(s, y, np.random.default_rng(200 + i))
    want = levels.astype(np.float64) * s.quant.step
    want -= n * s.quant.range  # the same float operations as the unpacking
    if not np.array_equal(got, want):
        bad = int(np.count_nonzero(got != want))
        raise AssertionError(f"{s.name} masked sum of {n}: {bad} of {cfg.numel} values wrong")
    bytes_pp = sum(len(c) for c in uploads[0]) / cfg.numel
    return SystemResult(s.name, True, bytes_pp, cfg.numel / best, ingest, cfg.numel / t, n)


def measure_all(cfg: HEBenchConfig | None = None) -> HEResult:
    """Every row, in one process, one system's contexts made once."""
    cfg = cfg or HEBenchConfig()
    if max(cfg.cohorts) > cfg.max_clients or min(cfg.cohorts) < 2:
        raise ValueError(f"cohorts {cfg.cohorts} must lie in 2..max_clients={cfg.max_clients}")
    out = [measure_plaintext(cfg)]
    base = measure(BASELINE, cfg.bfv_config())
    out.append(
        SystemResult(
            BASELINE, False, base.bytes_per_param, base.protect, base.ingest or {}, base.decrypt, 3
        )
    )
    for name in (PACKED, BFV):
        system = make_system(name, cfg.bfv_config())
        m = measure(name, cfg.bfv_config(), system)
        out.append(
            SystemResult(name, False, m.bytes_per_param, m.protect, m.ingest or {}, m.decrypt, 3)
        )
        out += [measure_masked(system, cfg, n) for n in cfg.cohorts]
    for s in out:
        s.goals = GOALS.get((s.system, s.masked))
        s.check_goals()
    return HEResult(cfg, out)


def rows(result: HEResult) -> list[Row]:
    """Report rows: each system against the plaintext baseline."""
    plain = result.systems[0]
    size = f"{result.cfg.numel / 1e6:.3g} M params"
    out: list[Row] = []
    for s in result.systems[1:]:
        tag = f"[{s.label} vs {PLAINTEXT}]"
        out.append(
            row(f"HE wire bytes/param {tag}", "B/param", s.bytes_per_param, plain.bytes_per_param)
        )
        out.append(
            row(
                f"HE protect incl. masks, 1 core, {size} {tag}",
                "params/s",
                s.protect,
                plain.protect,
            )
        )
        for n, v in s.ingest.items():
            out.append(
                row(
                    f"HE ingest, {n} clients, 1 core, {size} {tag}",
                    "params/s",
                    v,
                    plain.ingest.get(n),
                )
            )
        out.append(
            row(
                f"HE decrypt + unmask + unpack, {s.decrypt_clients} clients, 1 core, {size} {tag}",
                "params/s",
                s.decrypt,
                None,
            )
        )
    return out
