"""``secure-xfl demo``: a whole federation on this machine, over the real stack.

Provisions a fresh federation (CA, certificates, CKKS keys), starts the key
holder, the aggregator and three clouds as separate OS processes on 127.0.0.1
(mutually authenticated QUIC, CKKS, record-level DP-SGD in every silo), fine-tunes
a small GPT-2 on the offline corpus, runs (or reuses from its cache) the
non-private baseline with the same seed, rounds and local steps, and writes a
report with plots and the audited ledger.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from tqdm import tqdm

from secure_xfl.errors import SecureXFLError

if TYPE_CHECKING:
    from secure_xfl.experiments.baseline import BaselineSpec

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "secure_xfl.cli"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (defaults finish in a few minutes on 2 CPU cores)."""

    out: Path = Path("demo-out")
    """Report folder."""
    rounds: int = 5
    """Federated rounds."""
    clients: tuple[str, ...] = ("cloud-a", "cloud-b", "cloud-c")
    """Client (cloud) names."""
    rule: str = "fedavg"
    """Aggregation rule."""
    partition: str = "fixed"
    """Data partitioning among clouds."""
    local_steps: int = 30
    """Local steps per round per cloud."""
    batch_size: int = 128
    """Local batch size (DP-SGD: the expected Poisson batch, q ≈ 128 / 4,677 per silo)."""
    local_lr: float = 5e-3
    """Local (AdamW) learning rate. Batch, steps and rate were picked by measuring a grid
    in-process (``secure_xfl.experiments.baseline``; see README): at ε = 2 per silo this
    recipe ends within 4 % of the non-private run with the same recipe."""
    record_dp: bool = True
    """Record-level DP-SGD in every silo (the cross-silo default)."""
    epsilon: float = 2.0
    """Each silo's record-level ε target and budget (PLD, δ = ``delta``); σ_r is derived."""
    record_clip: float = 1.0
    """Per-record (per-block) clip C_r of DP-SGD."""
    delta: float = 1e-5
    """δ of every guarantee."""
    noise_multiplier: float = 0.0
    """Client-level DP σ over the sum (0: off; with 3 clients no useful update survives
    the noise a small client-level ε needs, so record-level DP protects the silos)."""
    clip_norm: float = 20.0
    """Client-level clip norm C of each whole update. With client-level noise off it only
    bounds one silo's influence (and the key holder's release check): about twice the
    norm of an honest round's update here (3–10); C = 1 would shrink every update ~10×."""
    baseline: bool = True
    """Also run (or reuse from ``out/cache``) the non-private baseline."""
    slow: dict[str, float] = field(default_factory=dict)
    """Per-client artificial slowdown factors (heterogeneous clouds)."""
    timeout_s: float = 300.0
    """Round deadline."""
    min_clients: int = 2
    """Smallest cohort the key holder decrypts."""
    server_lr: float = 1.0
    """Server learning rate (η of gradient aggregation; 1 = plain FedAvg)."""


def _base_config(cfg: DemoConfig) -> dict[str, Any]:
    record = {"enabled": cfg.record_dp, "max_grad_norm": cfg.record_clip,
              "target_epsilon": cfg.epsilon}  # fmt: skip
    privacy = {"noise_multiplier": cfg.noise_multiplier, "clip_norm": cfg.clip_norm,
               "delta": cfg.delta, "record": record}  # fmt: skip
    if not cfg.record_dp and cfg.noise_multiplier == 0:
        privacy["allow_no_dp"] = True
    return {
        "federation": {"rounds": cfg.rounds, "min_clients": cfg.min_clients},
        "privacy": privacy,
        "round": {
            "rule": cfg.rule,
            "local_steps": cfg.local_steps,
            "local_lr": cfg.local_lr,
            "batch_size": cfg.batch_size,
            "timeout_s": cfg.timeout_s,
            "server_lr": cfg.server_lr,
        },
    }


class _Procs:
    """Child processes with logs, stopped on exit whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        # Five processes share the machine: one intra-op thread each avoids the
        # oversubscription that otherwise slows every training step several-fold.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def wait_port(self, name: str, path: Path, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise SecureXFLError(f"{name} failed to start:\n{tail}")
            time.sleep(0.1)
        return int(path.read_text())

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_federation(cfg: DemoConfig, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Provision and run one federation; returns (round records, outcome)."""
    base = work / "base.toml"
    base.write_text(tomli_w.dumps(_base_config(cfg)))
    fed = work / "federation"
    subprocess.run(
        [
            *CLI,
            "provision",
            "--federation",
            "demo",
            "--clients",
            ",".join(cfg.clients),
            "--out",
            str(fed),
            "--config",
            str(base),
        ],
        check=True,
        capture_output=True,
    )
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    agg_out = work / "aggregator"
    data = ["--partition", cfg.partition]
    procs = _Procs(logs)
    try:
        procs.start(
            "keyholder",
            "keyholder",
            "--kit",
            str(fed / "keyholder"),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(work / "kh.port"),
        )
        kh = procs.wait_port("keyholder", work / "kh.port")
        agg = procs.start(
            "aggregator",
            "aggregator",
            "--kit",
            str(fed / "aggregator"),
            "--keyholder",
            f"127.0.0.1:{kh}",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(work / "ag.port"),
            "--model",
            "lm",
            "--out",
            str(agg_out),
            *data,
        )
        port = procs.wait_port("aggregator", work / "ag.port")
        for name in cfg.clients:
            procs.start(
                name,
                "client",
                "--kit",
                str(fed / f"client-{name}"),
                "--aggregator",
                f"127.0.0.1:{port}",
                "--trainer",
                "lm",
                "--slow",
                str(cfg.slow.get(name, 0.0)),
                *data,
            )
        rounds_file = agg_out / "rounds.jsonl"
        with tqdm(total=cfg.rounds, desc="federated rounds", unit="round", disable=None) as bar:
            while agg.poll() is None:
                done = rounds_file.read_text().count("\n") if rounds_file.exists() else 0
                bar.update(done - bar.n)
                time.sleep(0.5)
            done = rounds_file.read_text().count("\n") if rounds_file.exists() else 0
            bar.update(done - bar.n)
        outcome_file = agg_out / "outcome.json"
        if not outcome_file.exists():
            tail = (logs / "aggregator.log").read_text(errors="replace")[-3000:]
            raise SecureXFLError(f"the aggregator stopped without an outcome:\n{tail}")
        outcome = json.loads(outcome_file.read_text())
        for name in cfg.clients:
            procs.procs[name].wait(timeout=60)
    finally:
        procs.stop()
    records = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    outcome["ledger"] = str(fed / "keyholder" / "state" / "ledger.jsonl")
    outcome["keyholder_cert"] = str(fed / "keyholder" / "cert.pem")
    outcome["ca"] = str(fed / "ca" / "ca.pem")  # the provisioner's: the federation's anchor
    outcome["crl"] = str(fed / "ca" / "crl.pem")
    return records, outcome


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end and write its report; returns report.json's content."""
    start = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="secure-xfl-demo-") as tmp:
        work = Path(tmp)
        try:
            records, outcome = run_federation(cfg, work)
        finally:
            if (work / "logs").exists():
                shutil.copytree(work / "logs", cfg.out / "logs", dirs_exist_ok=True)
        if not records:
            raise SecureXFLError(f"no round completed: {outcome['outcome']}")
        initial = work / "aggregator" / "initial.json"
        outcome["initial"] = json.loads(initial.read_text()) if initial.exists() else None
        baseline = run_baseline(cfg) if cfg.baseline else None
        from secure_xfl.experiments.demo_report import write_report

        return write_report(cfg, records, outcome, time.monotonic() - start, baseline)


def baseline_spec(cfg: DemoConfig) -> BaselineSpec:
    """The non-private run the demo compares against: same clients, seed, rounds, local
    steps, batch and learning rate; no DP-SGD, no client-level clip or noise."""
    from secure_xfl.experiments.baseline import BaselineSpec

    return BaselineSpec(
        clients=cfg.clients, rounds=cfg.rounds, local_steps=cfg.local_steps,
        local_lr=cfg.local_lr, batch_size=cfg.batch_size, partition=cfg.partition,
        server_lr=cfg.server_lr,
    )  # fmt: skip


def run_baseline(cfg: DemoConfig) -> dict[str, Any] | None:
    """The non-private baseline, from ``out/cache`` when an identical one was run before."""
    if cfg.rule != "fedavg" or cfg.partition not in ("fixed", "dirichlet"):
        log.info("no non-private baseline for rule %s / partition %s", cfg.rule, cfg.partition)
        return None
    import torch

    from secure_xfl.experiments.baseline import cached_simulate

    # One thread, like every client process (OMP_NUM_THREADS=1): the non-private result
    # depends on the thread count through float summation order.
    torch.set_num_threads(1)
    with tqdm(total=cfg.rounds, desc="non-private baseline", unit="round", disable=None) as bar:
        return cached_simulate(
            baseline_spec(cfg), cfg.out / "cache", progress=lambda r, m: bar.update(1)
        )
