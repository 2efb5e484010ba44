"""The load generator's pure helpers, its kit settings, and its workers' torch-free imports."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.bench.loadclient import layout_of_arrays, random_update
from secure_xfl.bench.loadstats import (
    ProcStats,
    parse_cpu,
    parse_status,
    progress,
    round_row,
    split,
    summarise,
    table,
)
from secure_xfl.bench.loadtest import DEFAULT_PRESET, LoadtestConfig, kit_config, parser
from secure_xfl.crypto.context import PRESETS
from secure_xfl.errors import ConfigError

STATUS = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1536 kB\nThreads:\t3\n"
# The command name may hold spaces and ")" (fields 14 and 15 are utime and stime).
STAT = "4242 (odd ) name) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 77 0 0"


def test_proc_parsers() -> None:
    assert parse_status(STATUS) == {"VmHWM": 2048, "VmRSS": 1536}
    assert parse_cpu(STAT, tck=100) == pytest.approx(3.0)
    assert parse_status("VmRSS:\n") == {}


def test_proc_stats_of_this_process() -> None:
    s = ProcStats(os.getpid())
    s.sample()
    assert s.rss_mb > 1 and s.peak_mb >= s.rss_mb and s.cpu_s > 0
    gone = ProcStats(2**22 + 1)  # above any pid_max: the figures stay at zero
    gone.sample()
    assert (gone.rss_mb, gone.cpu_s) == (0.0, 0.0)


def test_split_deals_every_name_once() -> None:
    names = [f"c{i}" for i in range(10)]
    groups = split(names, 4)
    assert [len(g) for g in groups] == [3, 3, 2, 2]
    assert sorted(n for g in groups for n in g) == sorted(names)
    assert split(names[:2], 4) == [["c0"], ["c1"]]


def _line(r: int, seconds: float, up: int) -> dict[str, object]:
    return {"round": r, "seconds": seconds, "bytes_up": up, "participants": ["a", "b"]}


def test_round_rows_take_cpu_deltas_and_reset_peaks() -> None:
    agg, kh = ProcStats(1, rss_mb=100, peak_mb=180, cpu_s=5.0), ProcStats(2, 50, 60, 1.0)
    prev = {"agg": 0.0, "kh": 0.0, "clients": 0.0}
    first = round_row(_line(0, 2.0, 4_000_000), agg, kh, prev, clients_cpu=8.0)
    assert first["ingest_mb_s"] == pytest.approx(2.0)
    assert (first["aggregator_cpu_s"], first["aggregator_peak_mb"]) == (5.0, 180)
    assert agg.peak_mb == 100  # the next round's peak starts from the current RSS
    agg.cpu_s, kh.cpu_s = 7.5, 1.25
    second = round_row(_line(1, 0.0, 0), agg, kh, prev, clients_cpu=9.0)
    assert second["aggregator_cpu_s"] == 2.5 and second["keyholder_cpu_s"] == 0.25
    assert second["clients_cpu_s"] == 1.0 and second["ingest_mb_s"] is None
    assert "round 2/2" in progress(second, 2) and "— MB/s" in progress(second, 2)
    assert table([first, second]).count("\n") == 3


def test_summary_leaves_the_start_up_round_out() -> None:
    agg, kh = ProcStats(1, 100, 400, 0), ProcStats(2, 50, 50, 0)
    prev = {"agg": 0.0, "kh": 0.0, "clients": 0.0}
    rows = [round_row(_line(0, 30.0, 10**6), agg, kh, prev, 0.0)]
    rows += [round_row(_line(r, s, 10**7), agg, kh, prev, 0.0) for r, s in ((1, 2.0), (2, 4.0))]
    s = summarise(rows)
    assert s["round_s"] == 3.0 and s["ingest_mb_s"] == pytest.approx(3.75)
    assert s["aggregator_peak_mb"] == 400 and s["rounds"] == 3
    assert summarise([]) == {}
    assert summarise(rows[:1])["round_s"] == 30.0


def test_kit_config_admits_every_client() -> None:
    assert PRESETS[DEFAULT_PRESET].packed
    kits = kit_config(LoadtestConfig(clients=200, params=100_000, rounds=20))
    assert kits.federation.min_clients == 200 and kits.federation.rounds == 20
    assert kits.federation.preset == DEFAULT_PRESET
    assert kits.round.weighting == "client" and kits.privacy.noise_multiplier > 0
    assert not kits.privacy.record.enabled
    t = kits.transport
    assert t.handshake_timeout_s >= 60 and t.stream_timeout_s >= 60
    assert kits.dp_spec().noise_multiplier > 0
    assert kit_config(LoadtestConfig(10, 5, min_clients=7)).federation.min_clients == 7


@pytest.mark.parametrize(
    "cfg",
    [
        LoadtestConfig(clients=1, params=10),
        LoadtestConfig(clients=5, params=10, min_clients=6),
        LoadtestConfig(clients=5, params=10, noise_multiplier=0.0),
        LoadtestConfig(clients=5, params=10, preset="nope"),
    ],
)
def test_kit_config_refuses(cfg: LoadtestConfig) -> None:
    with pytest.raises(ConfigError):
        kit_config(cfg)


def test_command_reproduces_the_config() -> None:
    cfg = LoadtestConfig(clients=7, params=123, rounds=4, workers=2, datagram=1452)
    args = parser().parse_args(shlex.split(cfg.command())[2:])
    assert (args.clients, args.params, args.rounds, args.workers, args.datagram) == (
        7, 123, 4, 2, 1452,
    )  # fmt: skip
    assert LoadtestConfig(3, 9).command() == "secure-xfl loadtest --clients 3 --params 9 --rounds 3"


def test_layout_matches_the_torch_codec() -> None:
    import torch

    from secure_xfl.crypto.codec import layout_of

    model = {"w": np.zeros(7, np.float32), "b": np.zeros((2, 3), np.float64)}
    tensors = {k: torch.from_numpy(v) for k, v in model.items()}
    assert layout_of_arrays(model).digest == layout_of(tensors).digest
    vec = random_update(np.random.default_rng(0), 10_000, clip_norm=2.0)
    assert 0.5 < float(np.linalg.norm(vec)) < 1.5


def test_a_worker_seals_without_importing_torch(tmp_path: Path) -> None:
    """A worker's imports and one protected update (clip, noise, encrypt, sign) on a
    numpy vector leave torch unimported (each import costs ~300 MB of RSS)."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        import secure_xfl.bench.loadclient as lc
        from secure_xfl.bench.loadtest import LoadtestConfig, kit_config
        from secure_xfl.crypto.context import get_preset
        from secure_xfl.kit import Kit, provision
        from secure_xfl.privacy.protect import protect_vector

        cfg = kit_config(LoadtestConfig(clients=2, params=5000))
        provision(Path({str(tmp_path)!r}) / "fed", federation="t", clients=["a", "b"], cfg=cfg)
        kit = Kit.load(Path({str(tmp_path)!r}) / "fed" / "client-a", role="client")
        layout = lc.layout_of_arrays({{"weight": np.zeros(5000, np.float32)}})
        blob = protect_vector(
            lc.random_update(np.random.default_rng(1), 5000, 1.0), ctx=kit.public_context(),
            preset=get_preset(cfg.federation.preset), layout=layout, run="r", round=0,
            client="a", signing_key=kit.tls.private_key, dp=cfg.dp_spec(),
            weighting="client",
        ).encode()
        assert len(blob) > 5000
        print("torch" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_a_zombie_keeps_its_last_memory_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = ProcStats(7, rss_mb=300.0, peak_mb=300.0, cpu_s=1.0, hwm_mb=400.0)
    proc = tmp_path / "proc" / "7"
    proc.mkdir(parents=True)
    (proc / "status").write_text("Name:\tpython\nState:\tZ (zombie)\n")
    (proc / "stat").write_text(STAT)
    real = Path

    def fake(p: str) -> Path:
        return real(str(tmp_path) + p) if str(p).startswith("/proc/7/") else real(p)

    monkeypatch.setattr("secure_xfl.bench.loadstats.Path", fake)
    s.sample()
    assert (s.rss_mb, s.hwm_mb) == (300.0, 400.0) and s.cpu_s == pytest.approx(3.0)
