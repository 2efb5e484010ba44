"""``secure-xfl`` command line: provision, the services, demo, audit, bench, loadtest …

Every failure ends in one line on stderr, ``secure-xfl <command>: error: <message>``,
and one of the exit codes below (never a Python traceback; ``--log-level DEBUG``
logs it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np

from secure_xfl.cli_args import (  # noqa: F401  (EXIT_* are re-exported)
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliParser,
    HelpFormatter,
    _address,
    _float,
    _int_at_least,
    _model_spec,
    _non_negative,
    _positive,
    _run,
    _slow_spec,
    _writable_dir,
    _writable_file,
)
from secure_xfl.config import Rule
from secure_xfl.errors import ConfigError

log = logging.getLogger("secure_xfl.cli")


def _model_from_spec(spec: str) -> dict[str, np.ndarray]:
    """``vector:N`` (one zero float32 tensor; tests, benches) or ``lm`` (the small GPT-2)."""
    kind, _, arg = spec.partition(":")
    if kind == "vector" and arg.isdigit() and int(arg) > 0:
        return {"weight": np.zeros(int(arg), dtype=np.float32)}
    if spec == "lm":
        from secure_xfl.training.federated_lm import initial_model

        return initial_model()
    raise ConfigError(f"unknown model spec {spec!r} (expected vector:N or lm)")


def _data_spec(args: argparse.Namespace) -> Any:
    from secure_xfl.training.federated_lm import DataSpec

    return DataSpec(text=args.data, partition=args.partition, alpha=args.alpha)


def _cmd_provision(args: argparse.Namespace) -> int:
    from secure_xfl.config import KitConfig, load_config
    from secure_xfl.kit import add_client, provision, revoke

    out = Path(args.out)
    if args.add_client or args.revoke:
        flag = "--add-client" if args.add_client else "--revoke"
        extra = [f for f, v in (("--federation", args.federation), ("--clients", args.clients),
                                ("--config", args.config)) if v]  # fmt: skip
        if extra:
            raise ConfigError(
                f"{flag} changes an existing federation in --out and cannot be combined "
                f"with {', '.join(extra)} (those create a new one)"
            )
    if args.add_client:
        print(add_client(out, args.add_client))
        return 0
    if args.revoke:
        serial = revoke(out, args.revoke)
        print(f"revoked client {args.revoke} (serial {serial}); CRL written to every kit")
        return 0
    if not args.federation or not args.clients:
        missing = [f for f, v in (("--federation", args.federation),
                                  ("--clients", args.clients)) if not v]  # fmt: skip
        raise ConfigError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required to "
            "create a federation (or pass --add-client/--revoke to change an existing one)"
        )
    clients = [c.strip() for c in args.clients.split(",")]
    if not all(clients):
        raise ConfigError(f"--clients {args.clients!r} has an empty name; use e.g. a,b,c")
    cfg = load_config(Path(args.config)) if args.config else KitConfig()
    kits = provision(out, federation=args.federation, clients=clients, cfg=cfg)
    for name, path in kits.items():
        print(f"{name:>16}: {path}")
    return 0


def _cmd_keyholder(args: argparse.Namespace) -> int:
    from secure_xfl.kit import Kit
    from secure_xfl.services.keyholder import serve_keyholder
    from secure_xfl.services.runtime import write_port_file

    kit = Kit.load(Path(args.kit), role="keyholder")
    _writable_file(args.port_file, "--port-file")
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
    _writable_file(args.port_file, "--port-file")
    if args.out:
        _writable_dir(Path(args.out), "--out folder")
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


def _cmd_client(args: argparse.Namespace) -> int:
    from secure_xfl.cli_run import finish_torchrun, init_torchrun, rank_zero
    from secure_xfl.kit import Kit
    from secure_xfl.services.client import serve_client
    from secure_xfl.training.trainer import RandomTrainer

    kit = Kit.load(Path(args.kit), role="client")
    name = kit.config.party.name
    trainer: Any
    from secure_xfl.training.federated_lm import FederatedLMTrainer

    if args.trainer == "lm":
        distributed = init_torchrun()
        lm = FederatedLMTrainer(
            name, data=_data_spec(args), slow_factor=args.slow, device=args.device
        )
        if distributed and not rank_zero():
            lm.follow()  # only rank 0 talks to the aggregator
            finish_torchrun()
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
            finish_torchrun()


def _cmd_demo(args: argparse.Namespace) -> int:
    from secure_xfl.cli_run import demo

    return demo(args)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from secure_xfl.cli_run import experiment

    return experiment(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from secure_xfl.cli_run import bench

    return bench(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from secure_xfl.cli_run import export

    return export(args)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from secure_xfl.bench.loadtest import main as loadtest_main

    return loadtest_main(args.rest)


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
    s.add_argument("--alpha", type=_positive, default=0.5, help="Dirichlet concentration")


def _epilog(*examples: str) -> str:
    lines = "\n".join(f"  {e}" for e in examples)
    return f"example{'s' if len(examples) > 1 else ''}:\n{lines}\n\n{EXIT_CODES_HELP}"


COMMANDS = (
    "provision",
    "keyholder",
    "aggregator",
    "client",
    "demo",
    "experiment",
    "export",
    "audit",
    "bench",
    "loadtest",
)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="secure-xfl",
        description="Privacy-first secure aggregation for cross-cloud federated training.",
        epilog="example:\n  secure-xfl demo --fast\n\n" + EXIT_CODES_HELP,
    )
    p.add_argument(
        "--log-level", default="INFO", type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log verbosity",
    )  # fmt: skip
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=CliParser)

    s = sub.add_parser(
        "provision", help="create a federation CA and startup kits (offline)",
        description="Create a federation (CA, certificates, CKKS keys and one startup kit "
        "per party) in --out, or change an existing one with --add-client or --revoke.",
        epilog=_epilog(
            "secure-xfl provision --federation acme --clients a,b,c --out fed",
            "secure-xfl provision --out fed --add-client d",
            "secure-xfl provision --out fed --revoke b",
        ),
    )  # fmt: skip
    s.add_argument("--federation", help="new federation's name (lower-case DNS label)")
    s.add_argument("--clients", help="new federation's comma-separated client names, e.g. a,b,c")
    s.add_argument("--out", required=True, help="federation folder (must be empty when creating)")
    s.add_argument("--config", help="config.toml with [federation]/[privacy]/[round] defaults")
    change = s.add_mutually_exclusive_group()
    change.add_argument("--add-client", metavar="NAME", help="enrol one more client into --out")
    change.add_argument("--revoke", metavar="NAME", help="revoke a client's certificate in --out")
    s.set_defaults(func=_cmd_provision)

    s = sub.add_parser(
        "keyholder", help="run the key holder (decrypts aggregates under policy)",
        epilog=_epilog("secure-xfl keyholder --kit fed/keyholder --listen 0.0.0.0:8444"),
    )  # fmt: skip
    s.add_argument("--kit", required=True, help="the key holder's startup kit folder")
    s.add_argument("--listen", type=_address, help="HOST:PORT (default from the kit's config)")
    s.add_argument("--port-file", help="write the bound port here (with --listen HOST:0)")
    s.set_defaults(func=_cmd_keyholder)

    s = sub.add_parser(
        "aggregator", help="run the aggregator (sums ciphertexts only)",
        epilog=_epilog(
            "secure-xfl aggregator --kit fed/aggregator --model lm --keyholder kh.example:8444"
        ),
    )  # fmt: skip
    s.add_argument("--kit", required=True, help="the aggregator's startup kit folder")
    s.add_argument("--keyholder", type=_address, help="key holder HOST:PORT (default from the kit)")
    s.add_argument("--listen", type=_address, help="HOST:PORT (default from the kit's config)")
    s.add_argument(
        "--model", required=True, type=_model_spec,
        help="initial global model: lm (the small GPT-2 the lm clients fine-tune) or "
        "vector:N (N zeros; tests and benchmarks with random-trainer clients)",
    )  # fmt: skip
    _data_args(s)
    s.add_argument("--out", help="folder for rounds.jsonl and per-round global models")
    s.add_argument("--port-file", help="write the bound port here (with --listen HOST:0)")
    s.set_defaults(func=_cmd_aggregator)

    s = sub.add_parser(
        "client", help="run one client (trains, protects and uploads)",
        epilog=_epilog(
            "secure-xfl client --kit fed/client-a --trainer lm --aggregator agg.example:8443"
        ),
    )  # fmt: skip
    s.add_argument("--kit", required=True, help="this client's startup kit folder")
    s.add_argument(
        "--aggregator", type=_address, help="aggregator HOST:PORT (default from the kit)"
    )
    s.add_argument(
        "--trainer",
        choices=("lm", "random"),
        required=True,
        help="lm: fine-tune the small GPT-2 on this silo's data (aggregator --model lm); "
        "random: synthetic updates for tests and load runs, no training (--model vector:N)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the random-update trainer")
    s.add_argument(
        "--slow",
        type=_non_negative,
        default=0.0,
        help="lm trainer: sleep this many times the compute time per round (slow cloud)",
    )
    s.add_argument("--device", default="auto", help="lm trainer: auto, cpu, cuda, cuda:1 …")
    s.add_argument(
        "--delay",
        type=_non_negative,
        default=0.0,
        help="random trainer: seconds of simulated work per round",
    )
    _data_args(s)
    s.set_defaults(func=_cmd_client)

    from secure_xfl.experiments.demo import DemoConfig

    d = DemoConfig()
    s = sub.add_parser(
        "demo", help="run a whole federation locally and write a report",
        epilog=_epilog(
            "secure-xfl demo --fast --out demo-out",
            f"secure-xfl demo --rounds 10 --slow {d.clients[-1]}=3 --epsilon 4",
        ),
    )  # fmt: skip
    s.add_argument("--out", default=str(d.out), help="report folder")
    s.add_argument("--rounds", type=_int_at_least(1), default=d.rounds, help="federated rounds")
    s.add_argument(
        "--rule",
        default="fedavg",
        choices=typing.get_args(Rule),
        help="aggregation rule",
    )
    s.add_argument(
        "--partition", choices=("fixed", "dirichlet", "dynamic"), default="fixed",
        help="how the corpus is split among the clouds",
    )  # fmt: skip
    s.add_argument(
        "--local-steps", type=_int_at_least(1), default=d.local_steps,
        help="local steps per round",
    )  # fmt: skip
    s.add_argument(
        "--epsilon", type=_positive, default=d.epsilon,
        help=f"each silo's record-level ε budget at δ={d.delta:g} (σ_r is derived from it)",
    )  # fmt: skip
    s.add_argument(
        "--no-record-dp", action="store_true",
        help="turn record-level DP-SGD off (then set --noise, or the run has no DP)",
    )  # fmt: skip
    s.add_argument(
        "--noise", type=_non_negative, default=d.noise_multiplier,
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
        type=_slow_spec(d.clients),
        metavar="CLIENT=FACTOR",
        help=f"slow a cloud down, e.g. {d.clients[-1]}=3 (repeatable; clients: "
        f"{', '.join(d.clients)}; default: none)",
    )
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser(
        "experiment", help="the paper's rule × partitioning comparison",
        epilog=_epilog("secure-xfl experiment --rounds 3 --out experiment-out"),
    )  # fmt: skip
    s.add_argument("--rounds", type=_int_at_least(1), default=3, help="rounds per run (paper: 100)")
    s.add_argument("--local-steps", type=_int_at_least(1), default=20, help="local steps per round")
    s.add_argument("--out", default="experiment-out", help="results folder")
    s.set_defaults(func=_cmd_experiment)

    s = sub.add_parser(
        "export", help="write a run's global model in Hugging Face format (peft adapter + base)",
        epilog=_epilog("secure-xfl export --run demo-run/aggregator --out model"),
    )  # fmt: skip
    s.add_argument("--run", required=True, help="the aggregator's --out folder (global-N.npy)")
    s.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    s.add_argument(
        "--round", type=_int_at_least(0), default=None,
        help="N of global-N.npy (the model after N rounds; default: the last)",
    )  # fmt: skip
    s.set_defaults(func=_cmd_export)

    for name, text, func in (
        ("bench", "benchmarks vs the NVFlare-default CKKS baseline", _cmd_bench),
        ("loadtest", "N simulated clients against a real key holder and aggregator", _cmd_loadtest),
        ("audit", "verify a privacy ledger and recompute ε", _cmd_audit),
    ):  # each owns its whole argument list (see main)
        s = sub.add_parser(name, help=text, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``secure-xfl`` entry point; returns the exit code (see :data:`EXIT_CODES_HELP`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from secure_xfl.services.runtime import setup_logging

    # audit, bench and loadtest own their whole argument list (including --help).
    owners = {"audit": _cmd_audit, "bench": _cmd_bench, "loadtest": _cmd_loadtest}
    if argv and argv[0] in owners:
        setup_logging(argv[0], level="WARNING")
        func, ns = owners[argv[0]], argparse.Namespace(rest=argv[1:])
        return _run(f"secure-xfl {argv[0]}", lambda: func(ns))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    prog = f"secure-xfl {args.command}" if args.command else parser.prog
    if extra:  # named as the subcommand's own (argparse would blame the top level)
        CliParser(prog=prog).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.error(f"missing COMMAND: choose one of {', '.join(COMMANDS)}")
    setup_logging(args.command, level=args.log_level, as_json=args.log_json)
    return _run(prog, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
