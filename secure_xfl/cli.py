"""``secure-xfl`` command line: provision, keyholder, aggregator, client, demo, audit, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np

from secure_xfl.config import Rule
from secure_xfl.errors import SecureXFLError

log = logging.getLogger("secure_xfl.cli")


def _model_from_spec(spec: str) -> dict[str, np.ndarray]:
    """``vector:N`` (one zero float32 tensor; tests, benches) or ``lm`` (the small GPT-2)."""
    kind, _, arg = spec.partition(":")
    if kind == "vector" and arg.isdigit() and int(arg) > 0:
        return {"weight": np.zeros(int(arg), dtype=np.float32)}
    if spec == "lm":
        from secure_xfl.training.federated_lm import initial_model

        return initial_model()
    raise SecureXFLError(f"unknown model spec {spec!r} (expected vector:N or lm)")


def _data_spec(args: argparse.Namespace) -> Any:
    from secure_xfl.training.federated_lm import DataSpec

    return DataSpec(text=args.data, partition=args.partition, alpha=args.alpha)


def _cmd_provision(args: argparse.Namespace) -> int:
    from secure_xfl.config import KitConfig, load_config
    from secure_xfl.kit import add_client, provision, revoke

    out = Path(args.out)
    if args.add_client:
        print(add_client(out, args.add_client))
        return 0
    if args.revoke:
        serial = revoke(out, args.revoke)
        print(f"revoked client {args.revoke} (serial {serial}); CRL written to every kit")
        return 0
    if not args.federation or not args.clients:
        raise SecureXFLError("--federation and --clients are required to create a federation")
    cfg = load_config(Path(args.config)) if args.config else KitConfig()
    kits = provision(out, federation=args.federation, clients=args.clients.split(","), cfg=cfg)
    for name, path in kits.items():
        print(f"{name:>16}: {path}")
    return 0


def _cmd_keyholder(args: argparse.Namespace) -> int:
    from secure_xfl.kit import Kit
    from secure_xfl.services.keyholder import serve_keyholder
    from secure_xfl.services.runtime import write_port_file

    kit = Kit.load(Path(args.kit), role="keyholder")
    listen = args.listen or kit.config.endpoints.keyholder
    asyncio.run(serve_keyholder(kit, listen, ready=lambda p: write_port_file(args.port_file, p)))
    return 0


def _evaluator(args: argparse.Namespace) -> Any:
    if args.model != "lm":
        return None
    from secure_xfl.training.federated_lm import LMEvaluator

    return LMEvaluator(data=_data_spec(args))


def _cmd_aggregator(args: argparse.Namespace) -> int:
    from secure_xfl.kit import Kit
    from secure_xfl.services.aggregator import serve_aggregator
    from secure_xfl.services.runtime import write_port_file

    kit = Kit.load(Path(args.kit), role="aggregator")
    ok = asyncio.run(
        serve_aggregator(
            kit,
            listen=args.listen or kit.config.endpoints.aggregator,
            keyholder=args.keyholder or kit.config.endpoints.keyholder,
            model=_model_from_spec(args.model),
            evaluator=_evaluator(args),
            out_dir=Path(args.out) if args.out else None,
            ready=lambda p: write_port_file(args.port_file, p),
        )
    )
    return 0 if ok else 1


def _init_torchrun() -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _rank_zero() -> bool:
    import torch.distributed as dist

    return dist.get_rank() == 0


def _cmd_client(args: argparse.Namespace) -> int:
    from secure_xfl.kit import Kit
    from secure_xfl.services.client import serve_client
    from secure_xfl.training.trainer import RandomTrainer

    kit = Kit.load(Path(args.kit), role="client")
    name = kit.config.party.name
    trainer: Any
    from secure_xfl.training.federated_lm import FederatedLMTrainer

    if args.trainer == "lm":
        distributed = _init_torchrun()
        lm = FederatedLMTrainer(
            name, data=_data_spec(args), slow_factor=args.slow, device=args.device
        )
        if distributed and not _rank_zero():
            lm.follow()  # only rank 0 talks to the aggregator
            return 0
        trainer = lm
    else:
        trainer = RandomTrainer(name, seed=args.seed, delay_s=args.delay)
    try:
        return asyncio.run(
            serve_client(
                kit, aggregator=args.aggregator or kit.config.endpoints.aggregator, trainer=trainer
            )
        )
    finally:
        if isinstance(trainer, FederatedLMTrainer):
            trainer.close()  # releases torchrun followers


def _cmd_demo(args: argparse.Namespace) -> int:
    from secure_xfl.experiments.demo import DemoConfig, run_demo

    slow = {}
    for item in args.slow or []:
        name, _, factor = item.partition("=")
        slow[name] = float(factor)
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
        slow=slow,
    )
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


def _cmd_experiment(args: argparse.Namespace) -> int:
    from secure_xfl.experiments.paper import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(rounds=args.rounds, local_steps=args.local_steps, out=Path(args.out))
    print(run_experiment(cfg))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from secure_xfl.bench.cli import main as bench_main

    return bench_main(args.rest)


def _cmd_audit(args: argparse.Namespace) -> int:
    from secure_xfl.cli_audit import main as audit_main

    return audit_main(args.rest)


def _data_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", help="text file/folder or hub dataset id (default: offline corpus)")
    s.add_argument(
        "--partition",
        choices=("fixed", "dirichlet", "dynamic"),
        default="fixed",
        help="how the corpus is split among clients (demo federations)",
    )
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="secure-xfl",
        description="Privacy-first secure aggregation for cross-cloud federated training.",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    sub = p.add_subparsers(dest="command", required=True, metavar="ROLE")

    s = sub.add_parser("provision", help="create a federation CA and startup kits (offline)")
    s.add_argument("--federation", help="federation name (lower-case DNS label)")
    s.add_argument("--clients", help="comma-separated client names, e.g. a,b,c")
    s.add_argument("--out", required=True, help="output folder (must be empty when creating)")
    s.add_argument("--config", help="config.toml with [federation]/[privacy]/[round] defaults")
    s.add_argument("--add-client", metavar="NAME", help="enrol one more client into --out")
    s.add_argument("--revoke", metavar="NAME", help="revoke a client's certificate in --out")
    s.set_defaults(func=_cmd_provision)

    s = sub.add_parser("keyholder", help="run the key holder (decrypts aggregates under policy)")
    s.add_argument("--kit", required=True, help="the key holder's startup kit folder")
    s.add_argument("--listen", help="HOST:PORT (default from the kit's config)")
    s.add_argument("--port-file", help="write the bound port here (with --listen HOST:0)")
    s.set_defaults(func=_cmd_keyholder)

    s = sub.add_parser("aggregator", help="run the aggregator (sums ciphertexts only)")
    s.add_argument("--kit", required=True, help="the aggregator's startup kit folder")
    s.add_argument("--keyholder", help="key holder HOST:PORT (default from the kit)")
    s.add_argument("--listen", help="HOST:PORT (default from the kit's config)")
    s.add_argument("--model", default="vector:1000", help="initial model: vector:N or lm")
    _data_args(s)
    s.add_argument("--out", help="folder for rounds.jsonl and per-round global models")
    s.add_argument("--port-file", help="write the bound port here (with --listen HOST:0)")
    s.set_defaults(func=_cmd_aggregator)

    s = sub.add_parser("client", help="run one client (trains, protects and uploads)")
    s.add_argument("--kit", required=True, help="this client's startup kit folder")
    s.add_argument("--aggregator", help="aggregator HOST:PORT (default from the kit)")
    s.add_argument(
        "--trainer",
        choices=("random", "lm"),
        default="random",
        help="lm: fine-tune the small GPT-2; random: synthetic updates (tests)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the random-update trainer")
    s.add_argument(
        "--slow",
        type=float,
        default=0.0,
        help="sleep this many times the compute time per round (simulated slow cloud)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    s.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="random trainer: seconds of simulated work per round",
    )
    _data_args(s)
    s.set_defaults(func=_cmd_client)

    from secure_xfl.experiments.demo import DemoConfig

    d = DemoConfig()
    s = sub.add_parser(
        "demo", help="run a whole federation locally and write a report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    s.add_argument("--out", default=str(d.out), help="report folder")
    s.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds")
    s.add_argument(
        "--rule",
        default="fedavg",
        choices=typing.get_args(Rule),
    )
    s.add_argument("--partition", choices=("fixed", "dirichlet", "dynamic"), default="fixed")
    s.add_argument("--local-steps", type=int, default=d.local_steps, help="local steps per round")
    s.add_argument(
        "--epsilon", type=float, default=d.epsilon,
        help=f"each silo's record-level ε budget at δ={d.delta:g} (σ_r is derived from it)",
    )  # fmt: skip
    s.add_argument(
        "--no-record-dp", action="store_true",
        help="turn record-level DP-SGD off (then set --noise, or the run has no DP)",
    )  # fmt: skip
    s.add_argument(
        "--noise", type=float, default=d.noise_multiplier,
        help="client-level DP σ over the sum (0: off)",
    )  # fmt: skip
    s.add_argument("--no-baseline", action="store_true", help="skip the non-private baseline")
    s.add_argument(
        "--fast", action="store_true",
        help="3 rounds of 10 local steps: a quick look (ε still within --epsilon)",
    )  # fmt: skip
    s.add_argument(
        "--slow",
        action="append",
        metavar="CLIENT=FACTOR",
        help="slow a cloud down, e.g. cloud-c=3 (repeatable)",
    )
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("experiment", help="the paper's rule × partitioning comparison")
    s.add_argument("--rounds", type=int, default=3, help="rounds per run (paper: 100)")
    s.add_argument("--local-steps", type=int, default=20, help="local steps per round")
    s.add_argument("--out", default="experiment-out", help="results folder")
    s.set_defaults(func=_cmd_experiment)

    s = sub.add_parser(
        "bench", help="benchmarks vs the NVFlare-default CKKS baseline", add_help=False
    )
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("audit", help="verify a privacy ledger and recompute ε", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # audit and bench own their whole argument list (including --help).
    if argv and argv[0] in ("audit", "bench"):
        from secure_xfl.services.runtime import setup_logging

        setup_logging(argv[0], level="WARNING")
        ns = argparse.Namespace(rest=argv[1:])
        return _cmd_audit(ns) if argv[0] == "audit" else _cmd_bench(ns)
    args = build_parser().parse_args(argv)
    from secure_xfl.services.runtime import setup_logging

    setup_logging(args.command, level=args.log_level, as_json=args.log_json)
    try:
        return int(args.func(args))
    except SecureXFLError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
