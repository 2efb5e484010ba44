"""Training figures: DP-SGD (Opacus) vs non-private local training of the demo LM.

Both variants train the demo model (``LMConfig()``: a tiny GPT-2 + LoRA, built
offline) on one client's share (``cloud-a`` of three, ``fixed`` partition) of
the default corpus (``default_documents(1_000_000)``), with the same expected
batch size, learning rate, optimiser (AdamW) and step count:

* non-private: :func:`secure_xfl.training.lm.local_train` (batches drawn without
  replacement) — the baseline;
* DP-SGD: :func:`secure_xfl.training.dp_sgd.dp_local_train` (σ = 1, C = 1;
  Poisson sampling with q = batch / len(blocks), per-sample gradients).

Each variant runs in its own fresh subprocess with the same thread settings
(``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``torch.set_num_threads``), so one
variant's allocations and thread pools cannot colour the other's figures. In it:
data and model set-up (opacus imported for both), one warm-up call of the same
size, then ``repeats`` timed calls; the best counts (the machine may be shared).
Throughput = tokens actually processed (samples seen × block size) / seconds.

Memory on CPU: the peak resident set (``ru_maxrss``) at the end, and the training
increment = that peak minus the resident set after set-up; the kernel's
high-water mark is reset after set-up (``/proc/self/clear_refs``) so the peak is
training's own. On CUDA: ``torch.cuda.max_memory_allocated`` (peak) and its growth
over what set-up left allocated (increment).

``python -m secure_xfl.bench.training [--quick]`` prints the tables.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from secure_xfl.bench.report import Row, row

__all__ = [
    "BASELINE",
    "DP_SGD",
    "TrainingBenchConfig",
    "TrainingResult",
    "VariantResult",
    "measure",
    "rows",
    "run",
]

BASELINE = "non-private"
DP_SGD = "DP-SGD"
VARIANTS = (BASELINE, DP_SGD)
CLIENTS = ("cloud-a", "cloud-b", "cloud-c")
_MARK = "TRAINING-BENCH-RESULT "
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class TrainingBenchConfig:
    """Sizes of the training benchmark (the demo's settings by default)."""

    steps: int = 20
    """Optimiser steps per timed call (and in the warm-up call)."""
    batch_size: int = 64
    """Batch size of the baseline; DP-SGD's expected (Poisson) batch size."""
    lr: float = 3e-3
    """AdamW learning rate."""
    repeats: int = 2
    """Timed calls per variant (the best counts)."""
    threads: int = 1
    """Intra- and inter-op threads of each subprocess (same for both variants)."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    noise_multiplier: float = 1.0
    """DP-SGD σ."""
    max_grad_norm: float = 1.0
    """DP-SGD per-sample clip bound C."""
    max_bytes: int = 1_000_000
    """Corpus size (``default_documents``)."""
    client: str = "cloud-a"
    """Whose share of the training blocks is used."""

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.repeats, self.threads, self.max_bytes) < 1:
            raise ValueError("steps, batch_size, repeats, threads and max_bytes must be >= 1")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, not {self.device!r}")

    def command(self) -> str:
        """The ``secure-xfl bench`` invocation that reproduces these figures."""
        cmd = (
            f"secure-xfl bench --sections training --train-steps {self.steps} "
            f"--train-batch {self.batch_size} --train-threads {self.threads} "
            f"--train-repeats {self.repeats}"
        )
        return cmd + (f" --train-device {self.device}" if self.device != "cpu" else "")


@dataclass(frozen=True)
class VariantResult:
    """What one variant's subprocess measured."""

    variant: str
    batch_size: int
    steps: int
    tokens_per_s: float
    """Best of the timed calls."""
    samples: int
    """Samples processed by the best timed call."""
    seconds: float
    """Wall time of the best timed call."""
    peak_mib: float
    """Peak RSS (CPU) or peak CUDA memory allocated, MiB."""
    increment_mib: float
    """Peak minus what set-up left (RSS or CUDA allocated), MiB."""
    setup_mib: float
    """Resident set (CPU) or CUDA memory allocated after set-up, MiB."""
    memory: str
    """``RSS`` or ``CUDA allocated``."""
    hwm_reset: bool
    """Whether the RSS high-water mark could be reset after set-up (else the
    peak may be set-up's and the increment an upper bound)."""
    device: str
    threads: int
    loss: float


@dataclass(frozen=True)
class TrainingResult:
    """Both variants, and what they were measured on."""

    cfg: TrainingBenchConfig
    variants: dict[str, VariantResult]
    blocks: int
    block_size: int
    trainable: int
    torch: str

    @property
    def ratio(self) -> float:
        """DP-SGD / non-private throughput."""
        return self.variants[DP_SGD].tokens_per_s / self.variants[BASELINE].tokens_per_s

    def table(self) -> str:
        """The per-variant markdown table, what it ran on and the reproducing command."""
        base = self.variants[BASELINE]
        mem = base.memory
        lines = [
            f"| variant | batch | steps | tokens/s | ratio vs {BASELINE} | peak {mem} MiB "
            "| training increment MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in VARIANTS:
            v = self.variants[name]
            batch = f"{v.batch_size}" + (" (expected, Poisson)" if name == DP_SGD else "")
            lines.append(
                f"| {name} | {batch} | {v.steps} | {v.tokens_per_s:.4g} "
                f"| {v.tokens_per_s / base.tokens_per_s:.3g} | {v.peak_mib:.1f} "
                f"| {v.increment_mib:.1f} |"
            )
        c = self.cfg
        lines += [
            "",
            f"Demo LM (LMConfig(): {self.trainable:,} trainable parameters), {self.blocks:,} "
            f"blocks × {self.block_size} tokens ({c.client}'s share), AdamW lr {c.lr:g}; "
            f"DP-SGD σ={c.noise_multiplier:g}, C={c.max_grad_norm:g}. Device {base.device}, "
            f"{base.threads} thread(s) per variant (OMP_NUM_THREADS={c.threads}, "
            f"torch.set_num_threads({c.threads})), torch {self.torch}; one warm-up call, "
            f"best of {c.repeats} timed call(s), each variant in a fresh subprocess.",
        ]
        if not all(v.hwm_reset for v in self.variants.values()) and base.memory == "RSS":
            lines.append("RSS high-water mark not resettable here: increments are upper bounds.")
        lines.append(f"Reproduce: `{c.command()}`")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything measured, for ``--json``'s ``.training.json`` sidecar."""
        return {
            "config": asdict(self.cfg),
            "command": self.cfg.command(),
            "blocks": self.blocks,
            "block_size": self.block_size,
            "trainable": self.trainable,
            "torch": self.torch,
            "ratio": self.ratio,
            "variants": [asdict(self.variants[n]) for n in VARIANTS],
        }


# ---------------------------------------------------------------------------- child


def _rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _maxrss_mib()


def _maxrss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**10 if sys.platform != "darwin" else kib / 2**20


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (which ``ru_maxrss`` reads) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child(variant: str, cfg: TrainingBenchConfig) -> dict[str, Any]:
    import numpy as np
    import opacus  # noqa: F401  (imported for both variants: its memory is set-up's)
    import torch

    from secure_xfl.training.data import default_documents, make_blocks, train_eval_split
    from secure_xfl.training.dp_sgd import DPSGDConfig, dp_local_train
    from secure_xfl.training.lm import (
        LMConfig,
        build_model,
        local_train,
        num_trainable,
        prepare,
        resolve_device,
    )
    from secure_xfl.training.lm_trainer import client_share

    torch.set_num_threads(cfg.threads)
    try:
        torch.set_num_interop_threads(cfg.threads)
    except RuntimeError:  # already set (only possible if something ran parallel work)
        pass
    dev = resolve_device(cfg.device)
    lm = LMConfig()
    train, _ = train_eval_split(make_blocks(default_documents(cfg.max_bytes), lm.block_size))
    share = client_share(train, cfg.client, CLIENTS, "fixed")
    model = prepare(build_model(lm), dev)
    dp = DPSGDConfig(noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm)

    def call(seed: int) -> tuple[int, float]:
        rng = np.random.default_rng(seed)
        kw: dict[str, Any] = {
            "steps": cfg.steps,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "progress": False,
            "rng": rng,
        }
        if variant == DP_SGD:
            loss, seen, _q = dp_local_train(model, share, dp=dp, **kw)
        else:
            loss, seen = local_train(model, share, **kw)
        return seen, loss

    cuda = dev.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        setup = torch.cuda.memory_allocated(dev) / 2**20
        hwm = True
    else:
        setup = _rss_mib()
        hwm = _reset_hwm()
    call(0)  # warm-up: same size as a timed call
    best: tuple[float, float, int, float] | None = None  # (tokens/s, seconds, samples, loss)
    for r in range(cfg.repeats):
        start = time.perf_counter()
        seen, loss = call(r + 1)
        if cuda:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - start
        rate = seen * lm.block_size / dt
        if best is None or rate > best[0]:
            best = (rate, dt, seen, loss)
    assert best is not None
    rate, dt, seen, loss = best
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _maxrss_mib()
    return asdict(
        VariantResult(
            variant=variant,
            batch_size=cfg.batch_size,
            steps=cfg.steps,
            tokens_per_s=rate,
            samples=seen,
            seconds=dt,
            peak_mib=peak,
            increment_mib=peak - setup,
            setup_mib=setup,
            memory="CUDA allocated" if cuda else "RSS",
            hwm_reset=hwm,
            device=str(dev),
            threads=torch.get_num_threads(),
            loss=float(loss),
        )
    ) | {
        "blocks": len(share),
        "block_size": lm.block_size,
        "trainable": num_trainable(model),
        "torch": str(torch.__version__),
    }


# ---------------------------------------------------------------------------- parent


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(dict.fromkeys(_THREAD_VARS, str(threads)))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _spawn(variant: str, cfg: TrainingBenchConfig, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "secure_xfl.bench.training",
            "--child",
            variant,
            json.dumps(asdict(cfg)),
        ],
        env=_env(cfg.threads),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            out: dict[str, Any] = json.loads(line[len(_MARK) :])
            return out
    raise RuntimeError(
        f"training bench {variant!r} failed (exit {proc.returncode}): "
        f"{(proc.stdout + proc.stderr)[-3000:]}"
    )


def measure(cfg: TrainingBenchConfig | None = None, *, timeout: float = 1800.0) -> TrainingResult:
    """Run both variants, each in its own subprocess (baseline first)."""
    cfg = cfg or TrainingBenchConfig()
    got = {v: _spawn(v, cfg, timeout) for v in VARIANTS}
    meta = got[BASELINE]
    keys = VariantResult.__dataclass_fields__
    return TrainingResult(
        cfg=cfg,
        variants={v: VariantResult(**{k: d[k] for k in keys}) for v, d in got.items()},
        blocks=int(meta["blocks"]),
        block_size=int(meta["block_size"]),
        trainable=int(meta["trainable"]),
        torch=str(meta["torch"]),
    )


def rows(result: TrainingResult) -> list[Row]:
    """Throughput, peak memory and training increment: DP-SGD against non-private."""
    dp, base = result.variants[DP_SGD], result.variants[BASELINE]
    where = (
        f"demo LM, batch {result.cfg.batch_size}, {result.cfg.steps} steps, "
        f"{base.threads} thread(s), {base.device}"
    )
    tag = f"[{DP_SGD} vs {BASELINE}]"
    peak = "peak RSS" if base.memory == "RSS" else "peak CUDA memory allocated"
    return [
        row(f"training throughput, {where} {tag}", "tokens/s", dp.tokens_per_s, base.tokens_per_s),
        row(f"training {peak}, {where} {tag}", "MiB", dp.peak_mib, base.peak_mib),
        row(
            f"training memory increment, {where} {tag}", "MiB", dp.increment_mib, base.increment_mib
        ),
    ]


def run(cfg: TrainingBenchConfig | None = None) -> list[Row]:
    """The rows of :func:`measure`."""
    return rows(measure(cfg))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        variant, cfg = argv[1], TrainingBenchConfig(**json.loads(argv[2]))
        print(_MARK + json.dumps(_child(variant, cfg)), flush=True)
        return 0
    from secure_xfl.bench.report import markdown

    quick = "--quick" in argv
    cfg = TrainingBenchConfig(steps=3, batch_size=16, repeats=1) if quick else TrainingBenchConfig()
    result = measure(cfg)
    print(markdown(rows(result)))
    print()
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
