"""``secure-xfl demo | experiment | bench | export``: the commands that run local jobs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from secure_xfl.cli_args import EXIT_CODES_HELP, CliParser, HelpFormatter, _writable_dir
from secure_xfl.errors import ConfigError

log = logging.getLogger("secure_xfl.client")

__all__ = ["bench", "demo", "experiment", "export", "finish_torchrun", "init_torchrun", "rank_zero"]


def demo(args: argparse.Namespace) -> int:
    from secure_xfl.experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=Path(args.out),
        rounds=3 if args.fast else args.rounds,
        rule=args.rule,
        partition=args.partition,
        local_steps=10 if args.fast else args.local_steps,
        noise_multiplier=args.noise,
        record_dp=not args.no_record_dp,
        epsilon=args.epsilon,
        baseline=not args.no_baseline,
        slow=dict(args.slow or []),
    )
    _writable_dir(cfg.out, "report folder --out")
    report = run_demo(cfg)
    first = (report.get("initial") or {}).get("loss")
    last = report["rounds"][-1]["loss"]
    base = report["rounds"][-1].get("baseline_loss")
    vs = "" if base is None else f" (non-private baseline {base:.3f})"
    silos = report["privacy"]["per_silo"]
    eps = ", ".join(
        f"{c} {e:.3f}" if isinstance(e := i["epsilon"]["pld"], float) else f"{c} {e}"
        for c, i in sorted(silos.items())
    )  # JSON form: an unbounded ε is the string "inf"
    print(
        f"demo finished: {report['outcome']} in {report['wall_seconds']} s; "
        f"held-out loss {first:.3f} -> {last:.3f}{vs}\n"
        + (f"record-level ε per silo (PLD, δ={cfg.delta:g}): {eps}\n" if silos else "")
        + f"report in {cfg.out}/report.md\naudit the ledger: {report['audit_command']}"
    )
    return 0 if report["ok"] else 1


def experiment(args: argparse.Namespace) -> int:
    from secure_xfl.experiments.paper import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(rounds=args.rounds, local_steps=args.local_steps, out=Path(args.out))
    _writable_dir(cfg.out, "results folder --out")
    print(run_experiment(cfg))
    return 0


_BENCH_EPILOG = """\
example:
  secure-xfl bench --quick --sections crypto,round --json bench.json
"""


def bench(args: argparse.Namespace) -> int:
    from secure_xfl.bench import cli as bench_cli

    parser = bench_cli._parser()
    parser.__class__ = CliParser  # one-line errors, like every other command
    parser.prog = "secure-xfl bench"
    if any(a in ("-h", "--help") for a in args.rest):
        parser.epilog = _BENCH_EPILOG + "\n" + EXIT_CODES_HELP
        parser.formatter_class = HelpFormatter
        parser.print_help()
        return 0
    opts = parser.parse_args(args.rest)  # bad flags fail here, before any benchmark runs
    unknown = sorted({s for s in opts.sections.split(",") if s} - set(bench_cli.SECTIONS))
    if unknown:
        raise ConfigError(
            f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(bench_cli.SECTIONS)}"
        )
    return bench_cli.main(args.rest)


def export(args: argparse.Namespace) -> int:
    """Write a run's final (or ``--round``) global model in Hugging Face format."""
    from secure_xfl.training.export import export_model

    out = export_model(Path(args.run), Path(args.out), round=args.round)
    print(f"exported to {out}; reload with transformers + peft as {out}/README.txt shows")
    return 0


def init_torchrun() -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def rank_zero() -> bool:
    """Whether this torchrun process is rank 0."""
    import torch.distributed as dist

    return dist.get_rank() == 0


def finish_torchrun() -> None:
    """Leave the torchrun process group before exiting: a live gloo/NCCL group at
    interpreter shutdown can abort the process ("terminate called without an active
    exception"), which torchrun reports as a failed rank."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every rank reaches this point before any tears its group down: a rank that
        # destroys while a peer still finishes its last gloo exchange can abort.
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except RuntimeError as exc:  # a rank died or is stuck: tear down regardless
            log.warning("torchrun ranks did not all reach shutdown: %s", exc)
        dist.destroy_process_group()
