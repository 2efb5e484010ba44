"""``secure-xfl demo``: a whole federation on this machine, over the real stack.

Provisions a fresh federation (CA, certificates, CKKS keys), starts the key
holder, the aggregator and three clouds as separate OS processes on 127.0.0.1
(mutually authenticated QUIC, CKKS, record-level DP-SGD in every silo), fine-tunes
a small GPT-2 on the offline corpus, runs (or reuses from its cache) the
non-private baseline with the same seed, rounds and local steps, and writes a
report with plots and the audited ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import subprocess
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from tqdm import tqdm

from secure_xfl.config import Rule
from secure_xfl.errors import ConfigError, SecureXFLError
from secure_xfl.experiments.supervise import (  # noqa: F401  (re-exported for tests)
    _SIGNALS,
    CLI,
    CLIENT_EXPECTED_EXITS,
    DemoChildError,
    _Procs,
    last_error_line,
)

if TYPE_CHECKING:
    from secure_xfl.experiments.baseline import BaselineSpec

log = logging.getLogger(__name__)

#: Partitionings the demo's data layer knows (``secure-xfl demo --partition``).
PARTITIONS = ("fixed", "dirichlet", "dynamic")


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

    def __post_init__(self) -> None:
        """Refuse values no run can work with, before anything is provisioned."""

        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"demo: {name} must be {want} (got {getattr(self, name)!r})")

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise bad(name, "a finite number > 0")

        for name in ("rounds", "local_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "an integer ≥ 1")
        if not self.clients or len(set(self.clients)) != len(self.clients):
            raise bad("clients", "one or more distinct names")
        if self.rule not in typing.get_args(Rule):
            raise bad("rule", f"one of {', '.join(typing.get_args(Rule))}")
        if self.partition not in PARTITIONS:
            raise bad("partition", f"one of {', '.join(PARTITIONS)}")
        for name in ("local_lr", "clip_norm", "timeout_s", "server_lr"):
            positive(name)
        if self.record_dp:
            positive("epsilon")
            positive("record_clip")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise bad("noise_multiplier", "a finite number ≥ 0 (0: no client-level noise)")
        if not 0 < self.delta < 1:
            raise bad("delta", "in (0, 1)")
        mc = self.min_clients
        if isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= len(self.clients):
            raise bad("min_clients", f"an integer from 1 to the {len(self.clients)} clients")
        for name, factor in self.slow.items():
            if name not in self.clients:
                raise ConfigError(
                    f"demo: slow names {name!r}, which is not a client "
                    f"(clients: {', '.join(self.clients)})"
                )
            if not (math.isfinite(factor) and factor >= 0):
                raise ConfigError(f"demo: slow factor of {name} must be ≥ 0 (got {factor!r})")


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


def _provision(cfg: DemoConfig, fed: Path, base: Path) -> None:
    argv = [*CLI, "provision", "--federation", "demo", "--clients", ",".join(cfg.clients),
            "--out", str(fed), "--config", str(base)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        line = last_error_line(done.stdout + done.stderr) or (done.stderr or "").strip()[-400:]
        raise SecureXFLError(f"provisioning the demo federation failed: {line}")


def run_federation(
    cfg: DemoConfig, work: Path, *, log_dest: Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Provision and run one federation in ``work``; returns (round records, outcome).

    The children are supervised: one dying (see :meth:`_Procs.problem`) stops the rest
    and raises :class:`DemoChildError` naming it, its last error and its log (named
    under ``log_dest``, where the caller copies ``work/logs``, when given)."""
    base = work / "base.toml"
    base.write_text(tomli_w.dumps(_base_config(cfg)))
    fed = work / "federation"
    _provision(cfg, fed, base)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    agg_out = work / "aggregator"
    data = ["--partition", cfg.partition]
    procs = _Procs(logs, log_dest)
    rounds_file = agg_out / "rounds.jsonl"

    def done() -> int:
        return rounds_file.read_text().count("\n") if rounds_file.exists() else 0

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
        procs.start(
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
        outcome_file = agg_out / "outcome.json"
        with tqdm(total=cfg.rounds, desc="federated rounds", unit="round", disable=None) as bar:
            procs.supervise(
                clients=cfg.clients,
                min_clients=cfg.min_clients,
                outcome_file=outcome_file,
                tick=lambda: bar.update(done() - bar.n),
            )
        outcome = json.loads(outcome_file.read_text())
        # The clients heard the end before the aggregator wrote its outcome: give them
        # a moment to exit on their own; stop() ends any that do not.
        deadline = time.monotonic() + 10
        for name in cfg.clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs.procs[name].wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        procs.stop()
    records = [json.loads(line) for line in rounds_file.read_text().splitlines()]
    outcome["ledger"] = str(fed / "keyholder" / "state" / "ledger.jsonl")
    outcome["keyholder_cert"] = str(fed / "keyholder" / "cert.pem")
    outcome["ca"] = str(fed / "ca" / "ca.pem")  # the provisioner's: the federation's anchor
    outcome["crl"] = str(fed / "ca" / "crl.pem")
    return records, outcome


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end and write its report; returns report.json's content.

    The temporary federation (CA key, CKKS secret context) is removed on every way
    out, Ctrl-C and SIGTERM included; the children's logs are copied to ``out/logs``
    first."""
    start = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    with _SIGNALS.installed():
        work: Path | None = None
        try:
            with _SIGNALS.deferred():
                work = Path(tempfile.mkdtemp(prefix="secure-xfl-demo-"))
            records, outcome = run_federation(cfg, work, log_dest=cfg.out / "logs")
            if not records:
                raise SecureXFLError(f"no round completed: {outcome['outcome']}")
            initial = work / "aggregator" / "initial.json"
            outcome["initial"] = json.loads(initial.read_text()) if initial.exists() else None
            baseline = run_baseline(cfg) if cfg.baseline else None
            from secure_xfl.experiments.demo_report import write_report

            return write_report(cfg, records, outcome, time.monotonic() - start, baseline)
        finally:
            if work is not None:
                with _SIGNALS.deferred():
                    _clean_up(work, cfg.out / "logs")


def _clean_up(work: Path, logs_dest: Path) -> None:
    """Copy the logs out of ``work``, then remove it (it holds the federation's keys)."""
    try:
        if (work / "logs").exists():
            shutil.copytree(work / "logs", logs_dest, dirs_exist_ok=True)
    except OSError as exc:
        log.warning("could not copy the demo's logs to %s: %s", logs_dest, exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():
            log.error("could not remove %s (it holds the demo's CA key): remove it", work)


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
