"""``secure-xfl demo``: a whole federation on this machine, over the real stack.

Provisions a fresh federation (CA, certificates, CKKS keys), starts the key
holder, the aggregator and three clouds as separate OS processes on 127.0.0.1
(mutually authenticated QUIC, CKKS, client-level DP), fine-tunes a small GPT-2
on the offline corpus, and writes a report with plots and the audited ledger.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from tqdm import tqdm

from secure_xfl.errors import SecureXFLError

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
    local_steps: int = 20
    """Local steps per round per cloud."""
    noise_multiplier: float = 0.002
    """Client-level DP σ (tiny: 3 clients cannot buy a small ε; the report says so)."""
    clip_norm: float = 1.0
    """Client-level clip norm C."""
    slow: dict[str, float] = field(default_factory=dict)
    """Per-client artificial slowdown factors (heterogeneous clouds)."""
    timeout_s: float = 300.0
    """Round deadline."""
    min_clients: int = 2
    """Smallest cohort the key holder decrypts."""
    server_lr: float = 1.0
    """Server learning rate (η of gradient aggregation; 1 = plain FedAvg)."""


def _base_config(cfg: DemoConfig) -> dict[str, Any]:
    return {
        "federation": {"rounds": cfg.rounds, "min_clients": cfg.min_clients},
        "privacy": {"noise_multiplier": cfg.noise_multiplier, "clip_norm": cfg.clip_norm},
        "round": {
            "rule": cfg.rule,
            "local_steps": cfg.local_steps,
            "local_lr": 3e-3,
            "batch_size": 16,
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


def _finite(x: Any) -> Any:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def write_report(
    cfg: DemoConfig, records: list[dict[str, Any]], outcome: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """report.json, report.md, loss.png, bytes.png, and the ledger with what audits it
    (ledger.jsonl, keyholder-cert.pem, ca.pem, crl.pem) under ``cfg.out``."""
    from secure_xfl.privacy.audit import audit

    out = cfg.out
    rounds = [
        {
            "round": r["round"] + 1,
            "loss": r.get("loss"),
            "perplexity": r.get("perplexity"),
            "accuracy": r.get("accuracy"),
            "bytes_up": r["bytes_up"],
            "bytes_down": r["bytes_down"],
            "seconds": r["seconds"],
            "epsilon": _finite(r.get("epsilon")),
            "participants": r["participants"],
        }
        for r in records
    ]
    for src, name in (("ledger", "ledger.jsonl"), ("keyholder_cert", "keyholder-cert.pem"),
                      ("ca", "ca.pem"), ("crl", "crl.pem")):  # fmt: skip
        shutil.copy(outcome[src], out / name)
    report_audit = audit(
        out / "ledger.jsonl", out / "keyholder-cert.pem", ca=out / "ca.pem", crl=out / "crl.pem"
    )
    # What a user runs to check it again: the key holder's cert and the CRL are found
    # beside the ledger and the CA; the CA itself must always be named.
    command = shlex.join(["secure-xfl", "audit", str(out / "ledger.jsonl"),
                          "--ca", str(out / "ca.pem")])  # fmt: skip
    report = {
        "initial": outcome.get("initial"),
        "rounds": rounds,
        "outcome": outcome["outcome"],
        "ok": outcome["ok"],
        "wall_seconds": round(seconds, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "audit": report_audit.to_json(),
        "audit_command": command,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plots(out, rounds, (outcome.get("initial") or {}).get("loss"))
    lines = [
        "# secure-xfl demo report",
        "",
        f"Outcome: **{outcome['outcome']}** in {seconds:.0f} s, {len(rounds)} rounds, rule "
        f"`{cfg.rule}`, partition `{cfg.partition}`, clients {', '.join(cfg.clients)}.",
        "",
        f"Initial held-out loss {(outcome.get('initial') or {}).get('loss', float('nan')):.4f}"
        f" → {rounds[-1]['loss']:.4f} after round {rounds[-1]['round']}.",
        "",
        "| round | held-out loss | perplexity | accuracy | MB up | MB down | s | ε (RDP) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rounds:
        eps = r["epsilon"]
        lines.append(
            f"| {r['round']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['accuracy']:.3f} | "
            f"{r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} | {r['seconds']:.1f} | "
            f"{'∞' if eps is None else f'{eps:.4g}'} |"
        )
    lines += [
        "",
        f"Client-level DP: σ = {cfg.noise_multiplier}, C = {cfg.clip_norm}. With three clients",
        "no useful update survives the noise a small ε needs, so ε here is large; the number",
        "is honest, not a guarantee worth having. See README for record-level DP-SGD.",
        "",
        "![loss](loss.png) ![bytes](bytes.png)",
        "",
        "## Ledger audit",
        "",
        "Every decryption is on the signed ledger, refused ones included (they are charged",
        "in ε too). Check it against the federation CA yourself:",
        "",
        "```",
        command,
        "```",
        "",
        "```",
        report_audit.table(),
        "```",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def _plots(out: Path, rounds: list[dict[str, Any]], initial_loss: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in rounds]
    losses = [r["loss"] for r in rounds]
    if initial_loss is not None:  # round 0 = the initial model
        xs_loss, losses = [0, *xs], [initial_loss, *losses]
    else:
        xs_loss = xs
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs_loss, losses, marker="o")
    ax.set_xticks(xs_loss)
    ax.set(xlabel="round", ylabel="held-out loss", title="Global model loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([x - 0.2 for x in xs], [r["bytes_up"] / 1e6 for r in rounds], 0.4, label="up")
    ax.bar([x + 0.2 for x in xs], [r["bytes_down"] / 1e6 for r in rounds], 0.4, label="down")
    ax.set_xticks(xs)
    ax.set(xlabel="round", ylabel="MB", title="Bytes on the wire per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=110)
    plt.close(fig)


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
        return write_report(cfg, records, outcome, time.monotonic() - start)
