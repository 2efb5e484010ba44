"""``secure-xfl loadtest``: N simulated clients against the real key holder and aggregator.

Provisions a throwaway federation of N clients (packed preset, client weighting,
client-level DP with σ > 0, record-level DP off: simulated clients do not train),
starts ``secure-xfl keyholder`` and ``secure-xfl aggregator --model vector:P`` as
separate processes, and runs the clients in W worker processes
(:mod:`secure_xfl.bench.loadclient`: one kit, one QUIC connection and one sans-IO
``ClientRound`` per client, random updates protected by the real library path,
no torch). Round boundaries come from the aggregator's ``rounds.jsonl``; at each one
the aggregator's and key holder's RSS (``VmRSS``) and CPU seconds
(``utime + stime``) are read from ``/proc``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from secure_xfl.bench.loadstats import ProcStats, progress, round_row, split, summarise, table
from secure_xfl.bench.report import Row, row, stop_all
from secure_xfl.cli_args import EXIT_CODES_HELP, CliParser, _int_at_least, _positive
from secure_xfl.config import (
    FederationSettings,
    KitConfig,
    PrivacySettings,
    RecordPrivacySettings,
    RoundSettings,
)
from secure_xfl.crypto.context import PRESETS
from secure_xfl.errors import ConfigError
from secure_xfl.fsio import read_bounded
from secure_xfl.transport.config import MAX_DATAGRAM_SIZE, TransportConfig

__all__ = [
    "DEFAULT_PRESET",
    "LoadtestConfig",
    "bench_rows",
    "kit_config",
    "main",
    "parser",
    "run_loadtest",
]

_CLI = [sys.executable, "-m", "secure_xfl.cli"]
_MB = 1e6
#: rounds.jsonl is one short line per round; anything bigger is not the aggregator's.
_ROUNDS_LIMIT = 64 << 20
#: The packed preset when the build has one (the load generator measures the fast path).
DEFAULT_PRESET = next((p.name for p in PRESETS.values() if p.packed), "xfl-default")


@dataclass(frozen=True)
class LoadtestConfig:
    """One load test."""

    clients: int
    """Simulated clients (each with its own identity and connection)."""
    params: int
    """Model parameters P (the aggregator runs ``--model vector:P``)."""
    rounds: int = 3
    """Rounds of the run."""
    preset: str = DEFAULT_PRESET
    """CKKS preset; packed presets need client weighting and σ > 0 (both set here)."""
    workers: int = 0
    """Client worker processes (0: ``min(4, clients)``)."""
    noise_multiplier: float = 1.0
    """Client-level σ each client applies (N(0, σ²C²/K), K = min_clients)."""
    clip_norm: float = 1.0
    """Client-level clip C."""
    min_clients: int = 0
    """Cohort the key holder demands (0: every client, so each round carries N uploads)."""
    datagram: int = MAX_DATAGRAM_SIZE
    """QUIC datagram size of every party (loopback carries 16 KiB; WAN links ≈ 1452)."""
    timeout_s: float = 600.0
    """Round timeout of the kits (a round closes early once every client uploaded)."""
    deadline_s: float = 0.0
    """Give up on the whole run after this long (0: 300 s + 120 s per round)."""
    out: Path | None = None
    """Keep the federation, logs and rounds here (default: a temporary folder)."""
    masking: bool = True
    """Pairwise masks on packed presets (``privacy.masking`` of every kit)."""

    @property
    def n_workers(self) -> int:
        """Effective worker count."""
        return max(1, min(self.workers or 4, self.clients))

    @property
    def cohort(self) -> int:
        """Effective min_clients."""
        return self.min_clients or self.clients

    def command(self) -> str:
        """The ``secure-xfl loadtest`` command that reproduces this run."""
        d = LoadtestConfig(1, 1)
        extra = [f"--{k.replace('_', '-')} {v}" for k, v in (
            ("preset", self.preset), ("workers", self.workers), ("datagram", self.datagram),
            ("noise", self.noise_multiplier), ("min_clients", self.min_clients),
        ) if v != getattr(d, k if k != "noise" else "noise_multiplier")]  # fmt: skip
        extra += [] if self.masking else ["--no-masks"]
        return " ".join([f"secure-xfl loadtest --clients {self.clients} --params {self.params}",
                         f"--rounds {self.rounds}", *extra])  # fmt: skip


def kit_config(cfg: LoadtestConfig) -> KitConfig:
    """Kits that let ``cfg.clients`` clients take part: the cohort, the round timeout and
    transport timeouts sized for N handshakes and uploads on one host. Per-peer caps
    and the server-wide buffer budget stay at their defaults: they bound the
    aggregator's memory, which is what the load test measures."""
    if cfg.clients < 2 or not 2 <= cfg.cohort <= cfg.clients:
        raise ConfigError("a load test needs ≥ 2 clients and 2 ≤ min_clients ≤ clients")
    if PRESETS.get(cfg.preset) is None:
        raise ConfigError(f"unknown preset {cfg.preset!r}; known: {sorted(PRESETS)}")
    if cfg.noise_multiplier <= 0 and PRESETS[cfg.preset].packed:
        raise ConfigError(f"preset {cfg.preset} needs client-level noise (--noise > 0)")
    slack = 60.0 + cfg.clients * 0.5  # N clients queue for one event loop on a busy host
    return KitConfig(
        federation=FederationSettings(
            preset=cfg.preset,
            min_clients=cfg.cohort,
            rounds=cfg.rounds,
            max_clients=max(8, cfg.clients),
        ),
        privacy=PrivacySettings(
            clip_norm=cfg.clip_norm,
            noise_multiplier=cfg.noise_multiplier,
            record=RecordPrivacySettings(enabled=False),  # simulated clients do not train
            allow_no_dp=cfg.noise_multiplier == 0,
            masking=cfg.masking,
        ),
        round=RoundSettings(weighting="client", weight_cap=1.0, timeout_s=cfg.timeout_s),
        transport=TransportConfig(
            max_datagram_size=cfg.datagram,
            handshake_timeout_s=slack,
            connect_deadline_s=max(900.0, cfg.timeout_s),
            idle_timeout_s=slack + 60.0,
            stream_timeout_s=slack + 60.0,
        ),
    )


# -- the run ------------------------------------------------------------------------------
@dataclass
class _Worker:
    popen: subprocess.Popen[bytes]
    events: list[dict[str, Any]] = field(default_factory=list)

    def pump(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue  # not ours (a stray print); the worker's exit report decides


def _spawn(
    root: Path, name: str, args: list[str], *, stdout: Any = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = (root / f"{name}.log").open("wb")
    return subprocess.Popen(
        args, stdout=stdout or log, stderr=log if stdout else subprocess.STDOUT, env=env
    )


def _port(root: Path, name: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> int:
    pf = root / f"{name}.port"
    deadline = time.monotonic() + timeout
    while True:
        text = pf.read_text().strip() if pf.exists() else ""
        if text.isdigit():
            return int(text)
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (root / f"{name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} did not start:\n{tail}")
        time.sleep(0.1)


def run_loadtest(cfg: LoadtestConfig, *, echo: bool = True) -> dict[str, Any]:
    """Run one load test; returns the JSON report (``ok`` says whether it completed)."""
    from secure_xfl.kit import provision

    kits = kit_config(cfg)
    names = [f"c{i:04d}" for i in range(cfg.clients)]
    with tempfile.TemporaryDirectory(prefix="secure-xfl-loadtest-") as tmp:
        root = Path(cfg.out) if cfg.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        provision(root / "fed", federation="loadtest", clients=names, cfg=kits)
        provision_s = time.monotonic() - started
        if echo:
            print(f"provisioned {cfg.clients} clients in {provision_s:.1f} s; {cfg.command()}",
                  flush=True)  # fmt: skip
        procs: list[subprocess.Popen[bytes]] = []
        try:
            return _drive(cfg, root, names, procs, provision_s, echo)
        finally:
            stop_all(procs, 15.0)


def _drive(cfg: LoadtestConfig, root: Path, names: list[str], procs: list[Any],
           provision_s: float, echo: bool) -> dict[str, Any]:  # fmt: skip
    fed, out = root / "fed", root / "agg-out"
    listen = ["--listen", "127.0.0.1:0", "--port-file"]
    kh_proc = _spawn(root, "keyholder", [*_CLI, "keyholder", "--kit", str(fed / "keyholder"),
                                         *listen, str(root / "keyholder.port")])  # fmt: skip
    procs.append(kh_proc)
    kh_port = _port(root, "keyholder", kh_proc)
    agg_proc = _spawn(root, "aggregator", [
        *_CLI, "aggregator", "--kit", str(fed / "aggregator"), "--keyholder",
        f"127.0.0.1:{kh_port}", "--model", f"vector:{cfg.params}", "--out", str(out),
        *listen, str(root / "aggregator.port"),
    ])  # fmt: skip
    procs.append(agg_proc)
    agg_port = _port(root, "aggregator", agg_proc)
    workers: list[_Worker] = []
    for i, group in enumerate(split(names, cfg.n_workers)):
        args = [sys.executable, "-m", "secure_xfl.bench.loadclient", "--fed", str(fed),
                "--names", ",".join(group), "--aggregator", f"127.0.0.1:{agg_port}",
                "--seed", str(i * 100_003)]  # fmt: skip
        w = _Worker(_spawn(root, f"worker-{i}", args, stdout=subprocess.PIPE))
        procs.append(w.popen)
        assert w.popen.stdout is not None
        threading.Thread(target=w.pump, args=(w.popen.stdout,), daemon=True).start()
        workers.append(w)
    agg, kh = ProcStats(agg_proc.pid), ProcStats(kh_proc.pid)
    wstats = [ProcStats(w.popen.pid) for w in workers]
    prev = {"agg": 0.0, "kh": 0.0, "clients": 0.0}
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + (cfg.deadline_s or 300.0 + 120.0 * cfg.rounds)
    timed_out = False
    while True:
        for s in (agg, kh, *wstats):
            s.sample()
        lines = []
        if (out / "rounds.jsonl").exists():
            text = read_bounded(out / "rounds.jsonl", _ROUNDS_LIMIT).decode()
            lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        for line in lines[len(rows) :]:
            rows.append(round_row(line, agg, kh, prev, sum(s.cpu_s for s in wstats)))
            if echo:
                print(progress(rows[-1], cfg.rounds), flush=True)
        if agg_proc.poll() is not None and len(lines) == len(rows):
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.1)
    for w in workers:  # clients hear ``done`` within the aggregator's linger
        try:
            w.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            w.popen.terminate()
    time.sleep(0.2)  # the pump threads read the last lines
    exits = [next((e for e in w.events if e.get("event") == "exit"), None) for w in workers]
    events = [e for w in workers for e in w.events]
    errors = [e for e in events if e.get("event") in ("error", "refused")]
    outcome_path = out / "outcome.json"
    outcome = json.loads(read_bounded(outcome_path, 1 << 20)) if outcome_path.exists() else {}
    torch = any(e is None or e.get("torch") for e in exits)
    ok = (not timed_out and agg_proc.returncode == 0 and len(rows) == cfg.rounds
          and all(e is not None and e["failed"] == 0 for e in exits) and not torch)  # fmt: skip
    return {
        "ok": ok,
        "command": cfg.command(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "workers": cfg.n_workers,
        "provision_s": round(provision_s, 2),
        "aggregator_rc": agg_proc.returncode,
        "timed_out": timed_out,
        "outcome": outcome,
        "rounds": rows,
        "summary": summarise(rows),
        "rss_hwm_mb": {"aggregator": round(agg.hwm_mb, 1), "keyholder": round(kh.hwm_mb, 1)},
        "worker_exits": exits,
        "workers_imported_torch": torch,
        "client_errors": errors[:20],
        "uploads_reported": sum(1 for e in events if e.get("event") == "upload"),
        "logs": str(root) if cfg.out else None,
    }


def parser() -> CliParser:
    """``secure-xfl loadtest``'s own argument list (the top-level CLI hands it argv)."""
    p = CliParser(
        prog="secure-xfl loadtest",
        description=__doc__,
        epilog="example:\n  secure-xfl loadtest --clients 200 --params 100000 --rounds 20 "
        "--json load.json\n\n" + EXIT_CODES_HELP,
    )
    d = LoadtestConfig(1, 1)
    p.add_argument("--clients", type=_int_at_least(2), required=True, help="simulated clients N")
    p.add_argument("--params", type=_int_at_least(1), default=100_000, help="model parameters P")
    p.add_argument("--rounds", type=_int_at_least(1), default=d.rounds, help="rounds R")
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="CKKS preset")
    p.add_argument("--workers", type=_int_at_least(1), help="client processes (default: ≤ 4)")
    p.add_argument("--noise", type=_positive, default=d.noise_multiplier, help="client-level σ")
    p.add_argument("--min-clients", type=_int_at_least(2), help="cohort (default: all N)")
    p.add_argument("--datagram", type=_int_at_least(1200), default=d.datagram,
                   help="QUIC datagram bytes (16 KiB suits loopback; WAN ≈1452)")  # fmt: skip
    p.add_argument("--timeout", type=_positive, default=d.timeout_s, help="round timeout, s")
    p.add_argument("--deadline", type=_positive, help="give up after this many s (default: "
                   "300 + 120 per round)")  # fmt: skip
    p.add_argument(
        "--no-masks",
        action="store_true",
        help="packed presets without pairwise masks (every kit's privacy.masking)",
    )
    p.add_argument("--json", metavar="OUT", help="write the report here")
    p.add_argument("--out", help="keep federation, logs and rounds.jsonl in this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one load test from the command line; 0 when every round completed."""
    args = parser().parse_args(argv)
    cfg = LoadtestConfig(
        clients=args.clients, params=args.params, rounds=args.rounds, preset=args.preset,
        workers=args.workers or 0, noise_multiplier=args.noise, min_clients=args.min_clients or 0,
        datagram=args.datagram, timeout_s=args.timeout, deadline_s=args.deadline or 0.0,
        out=Path(args.out) if args.out else None, masking=not args.no_masks,
    )  # fmt: skip
    if cfg.out is not None and cfg.out.exists() and any(cfg.out.iterdir()):
        raise ConfigError(f"--out {cfg.out} exists and is not empty")
    report = run_loadtest(cfg)
    print(table(report["rounds"]))
    s = report["summary"]
    if s:
        print(f"steady rounds: {s['round_s']:.2f} s, {s['ingest_mb_s'] or 0:.1f} MB/s ingest; "
              f"peak RSS aggregator {s['aggregator_peak_mb']:.0f} MB, key holder "
              f"{s['keyholder_peak_mb']:.0f} MB")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if not report["ok"]:
        why = ("workers imported torch" if report["workers_imported_torch"] else
               f"{len(report['rounds'])}/{cfg.rounds} rounds, aggregator rc "
               f"{report['aggregator_rc']}, timed out: {report['timed_out']}")  # fmt: skip
        print(f"secure-xfl loadtest: error: the run did not complete ({why})", file=sys.stderr)
        return 1
    return 0


def bench_rows(
    clients: Sequence[int] = (10, 50, 200), params: int = 100_000, rounds: int = 3
) -> list[Row]:
    """``secure-xfl bench --sections loadtest``: one load test per cohort size; each
    metric names the command that reproduces it."""
    rows: list[Row] = []
    for n in clients:
        cfg = LoadtestConfig(clients=n, params=params, rounds=rounds)
        report = run_loadtest(cfg, echo=False)
        if not report["ok"]:
            raise RuntimeError(f"{cfg.command()} did not complete: {report['summary']}")
        s, what = (
            report["summary"],
            f"{n} clients × {params:,} params, {cfg.preset} [{cfg.command()}]",
        )
        rows += [
            row(f"loadtest round time, {what}", "s", s["round_s"], None),
            row(f"loadtest ingest, {what}", "MB/s", s["ingest_mb_s"], None),
            row(f"loadtest aggregator CPU per round, {what}", "s", s["aggregator_cpu_s"], None),
            row(f"loadtest aggregator peak RSS, {what}", "MB", s["aggregator_peak_mb"], None),
            row(f"loadtest key holder peak RSS, {what}", "MB", s["keyholder_peak_mb"], None),
        ]
    return rows


def masking_rows(
    clients: Sequence[int] = (3, 10),
    params: int = 1_000_000,
    presets: Sequence[str] = ("xfl-packed", "bfv-lanes"),
    rounds: int = 3,
) -> list[Row]:
    """``secure-xfl bench --sections masking``: the steady round time of a masked run
    beside the same run without masks (same preset, cohort and host, one after the
    other); the ratio is what pairwise masks cost a round."""
    rows: list[Row] = []
    for preset in presets:
        for n in clients:
            times = []
            for masking in (True, False):
                cfg = LoadtestConfig(clients=n, params=params, rounds=rounds, preset=preset,
                                     masking=masking)  # fmt: skip
                report = run_loadtest(cfg, echo=False)
                if not report["ok"]:
                    raise RuntimeError(f"{cfg.command()} did not complete: {report['summary']}")
                times.append(report["summary"]["round_s"])
            what = f"{n} clients × {params:,} params, {preset}, masked vs unmasked"
            rows.append(row(f"round time, {what} [{cfg.command()}]", "s", times[0], times[1]))
    return rows
