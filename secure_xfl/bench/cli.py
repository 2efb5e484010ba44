"""``secure-xfl bench [--json OUT] [--quick]``: every figure of issue 7 in one run."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from secure_xfl.bench.report import Row, markdown, write_json

SECTIONS = ("crypto", "transport", "round", "training", "loadtest", "he", "masking", "wan")
#: What runs without --sections: the load test takes minutes at 200 clients, so it is
#: asked for by name (``--sections loadtest``). ``he`` (every HE system side by side,
#: masked cohorts of 3 and 8, 1M params, one core) takes ~25-40 s, so it runs by default.
DEFAULT_SECTIONS = ("crypto", "transport", "round", "training", "he")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import tenseal

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "tenseal": tenseal.__version__,
        "platform": platform.platform(),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secure-xfl bench", description=__doc__)
    p.add_argument("--json", metavar="OUT", help="write the rows as a JSON list here")
    p.add_argument("--quick", action="store_true", help="small sizes (CI): seconds, not minutes")
    p.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default "
        f"{','.join(DEFAULT_SECTIONS)}; loadtest, masking and wan take minutes: ask for "
        "them by name; wan needs root)",
    )
    p.add_argument("--numel", type=int, help="crypto update size (default 262144; quick 12288)")
    p.add_argument("--clients", help="ingest cohort sizes, e.g. 3,10,50")
    p.add_argument("--transport-mb", type=int, help="upload size (default 100; quick 2)")
    p.add_argument("--datagrams", help="QUIC datagram sizes (default 1200,1452,9000)")
    p.add_argument("--round-numel", type=int, help="round update size (default 1e6)")
    p.add_argument("--train-steps", type=int, help="training steps (default 20; quick 3)")
    p.add_argument("--train-batch", type=int, help="training batch size (default 64; quick 16)")
    p.add_argument("--train-threads", type=int, default=1, help="torch/OMP threads (default 1)")
    p.add_argument("--train-repeats", type=int, help="timed training calls (default 2; quick 1)")
    p.add_argument(
        "--train-device", choices=("cpu", "cuda", "auto"), default="cpu", help="default cpu"
    )
    p.add_argument("--load-clients", help="load-test cohorts (default 10,50,200; quick 10)")
    p.add_argument("--load-params", type=int, help="load-test parameters (default 100000)")
    p.add_argument("--load-rounds", type=int, help="load-test rounds (default 3; quick 2)")
    p.add_argument("--he-numel", type=int, help="he section update size (default 1e6; quick 20000)")
    p.add_argument(
        "--he-clients", help="he section cohorts, masked and ingest (default 3,8; quick 3)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections, print a markdown table, optionally write JSON."""
    args = _parser().parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    started = time.monotonic()
    if "crypto" in sections:
        from secure_xfl.bench.crypto import CryptoBenchConfig
        from secure_xfl.bench.crypto import run as crypto_run

        clients = tuple(int(c) for c in args.clients.split(",")) if args.clients else (3, 10, 50)
        numel = args.numel or (12_288 if args.quick else 1 << 18)
        rows += crypto_run(
            CryptoBenchConfig(numel=numel, clients=clients, repeats=1 if args.quick else 2)
        )
    if "transport" in sections:
        from secure_xfl.bench.transport import run as transport_run

        mb = args.transport_mb or (2 if args.quick else 100)
        sizes = tuple(int(d) for d in (args.datagrams or "1200,1452,9000").split(","))
        rows += transport_run(mb, sizes)
    if "round" in sections:
        from secure_xfl.bench.round import run as round_run

        rows += round_run(args.round_numel or (30_000 if args.quick else 1_000_000))
    training = None
    if "training" in sections:
        from secure_xfl.bench.training import TrainingBenchConfig
        from secure_xfl.bench.training import measure as training_measure
        from secure_xfl.bench.training import rows as training_rows

        training = training_measure(
            TrainingBenchConfig(
                steps=args.train_steps or (3 if args.quick else 20),
                batch_size=args.train_batch or (16 if args.quick else 64),
                repeats=args.train_repeats or (1 if args.quick else 2),
                threads=args.train_threads,
                device=args.train_device,
            )
        )
        rows += training_rows(training)
    if "wan" in sections:  # needs root and network namespaces; skips with the reason
        from secure_xfl.bench.wan import bench_rows as wan_rows

        rows += wan_rows(2, timeout_s=60) if args.quick else wan_rows()
    if "masking" in sections:
        from secure_xfl.bench.loadtest import masking_rows

        rows += masking_rows((3,) if args.quick else (3, 10),
                             params=20_000 if args.quick else 1_000_000,
                             rounds=2 if args.quick else 3)  # fmt: skip
    if "loadtest" in sections:
        from secure_xfl.bench.loadtest import bench_rows

        cohorts = args.load_clients or ("10" if args.quick else "10,50,200")
        rows += bench_rows(
            tuple(int(c) for c in cohorts.split(",")),
            params=args.load_params or 100_000,
            rounds=args.load_rounds or (2 if args.quick else 3),
        )
    he = None
    if "he" in sections:
        from secure_xfl.bench import he as he_bench

        cohorts = args.he_clients or ("3" if args.quick else "3,8")
        he = he_bench.measure_all(
            he_bench.HEBenchConfig(
                numel=args.he_numel
                or (he_bench.QUICK_NUMEL if args.quick else he_bench.DEFAULT_NUMEL),
                cohorts=tuple(int(c) for c in cohorts.split(",")),
                repeats=1 if args.quick else he_bench.HEBenchConfig.repeats,
            )
        )
        rows += he_bench.rows(he)
    print(markdown(rows))
    if training is not None:
        print("\n" + training.table())
    if he is not None:
        print("\n" + he.table())
    info = machine()
    print(
        f"\n{info['nproc']} cores, {info['cpu']}, Python {info['python']}, "
        f"TenSEAL {info['tenseal']}; {time.monotonic() - started:.0f} s"
    )
    if args.json:
        write_json(Path(args.json), rows)
        Path(args.json).with_suffix(".machine.json").write_text(json.dumps(info, indent=1))
        if training is not None:
            sidecar = Path(args.json).with_suffix(".training.json")
            sidecar.write_text(json.dumps(training.to_json(), indent=1) + "\n")
        if he is not None:
            sidecar = Path(args.json).with_suffix(".he.json")
            sidecar.write_text(json.dumps(he.to_json(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
