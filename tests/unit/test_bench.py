"""A tiny run of ``secure-xfl bench``: the row schema, not the speeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_xfl.bench.cli import main
from secure_xfl.bench.report import ROW_KEYS, markdown, row

pytestmark = pytest.mark.timeout(600)


def test_row_ratio_and_markdown() -> None:
    r = row("m", "u", 2.0, 4.0)
    assert r == {"metric": "m", "unit": "u", "ours": 2.0, "baseline": 4.0, "ratio": 0.5}
    assert row("m", "u", 1.0, 0.0)["ratio"] is None
    assert row("m", "u", math.inf, 1.0)["ours"] is None
    assert "| m | u | 2 | 4 | 0.5 |" in markdown([r])


def test_tiny_bench_writes_rows_with_the_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--sections", "crypto,transport", "--numel", "5000", "--clients", "3"]
    argv += ["--transport-mb", "1", "--datagrams", "1452", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert rows and all(tuple(r) == ROW_KEYS for r in rows)
    for r in rows:
        assert isinstance(r["metric"], str) and isinstance(r["unit"], str)
        for k in ("ours", "baseline", "ratio"):
            assert r[k] is None or isinstance(r[k], int | float)
    metrics = " ".join(r["metric"] for r in rows)
    for needle in (
        "wire bytes/param",
        "protect, 1 core",
        "ingest, 3 clients",
        "decrypt",
        "error",
        "goodput",
        "xfl-packed",
        "nvflare-default",
        "plaintext fp32",
    ):
        assert needle in metrics
    assert "| metric | unit | ours | baseline | ratio |" in capsys.readouterr().out


def test_unknown_section_is_refused() -> None:
    assert main(["--sections", "nope"]) == 2


def test_tiny_training_section_measures_both_variants() -> None:
    from secure_xfl.bench import training

    cfg = training.TrainingBenchConfig(steps=2, batch_size=8, repeats=1, max_bytes=100_000)
    result = training.measure(cfg)
    assert set(result.variants) == {"non-private", "DP-SGD"}
    for v in result.variants.values():
        assert math.isfinite(v.tokens_per_s) and v.tokens_per_s > 0
        assert v.samples > 0 and v.steps == 2 and v.batch_size == 8 and v.threads == 1
        assert v.tokens_per_s == pytest.approx(v.samples * result.block_size / v.seconds)
        assert v.peak_mib > 0 and math.isfinite(v.increment_mib) and v.memory == "RSS"
    dp, base = result.variants["DP-SGD"].tokens_per_s, result.variants["non-private"].tokens_per_s
    assert result.ratio == pytest.approx(dp / base)
    rows = training.rows(result)
    assert [r["unit"] for r in rows] == ["tokens/s", "MiB", "MiB"]
    assert all(tuple(r) == ROW_KEYS and "[DP-SGD vs non-private]" in r["metric"] for r in rows)
    assert rows[0]["ours"] == pytest.approx(dp, rel=1e-3)
    assert rows[0]["baseline"] == pytest.approx(base, rel=1e-3)
    assert rows[0]["ratio"] == pytest.approx(dp / base, rel=1e-3)
    table = result.table()
    assert "| variant | batch | steps | tokens/s |" in table and "1 thread(s)" in table
    assert "secure-xfl bench --sections training --train-steps 2 --train-batch 8" in table


def test_training_section_is_wired_into_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from secure_xfl.bench import training

    seen: list[training.TrainingBenchConfig] = []

    def fake(cfg: training.TrainingBenchConfig) -> training.TrainingResult:
        seen.append(cfg)
        v = {
            name: training.VariantResult(
                variant=name,
                batch_size=cfg.batch_size,
                steps=cfg.steps,
                tokens_per_s=tps,
                samples=10,
                seconds=640 / tps,
                peak_mib=peak,
                increment_mib=peak - 1.0,
                setup_mib=1.0,
                memory="RSS",
                hwm_reset=True,
                device="cpu",
                threads=cfg.threads,
                loss=5.0,
            )
            for name, tps, peak in (("non-private", 400.0, 3.0), ("DP-SGD", 100.0, 5.0))
        }
        return training.TrainingResult(cfg, v, blocks=10, block_size=64, trainable=7, torch="x")

    monkeypatch.setattr(training, "measure", fake)
    out = tmp_path / "bench.json"
    assert main(["--sections", "training", "--quick", "--json", str(out)]) == 0
    assert seen == [training.TrainingBenchConfig(steps=3, batch_size=16, repeats=1)]
    rows = json.loads(out.read_text())
    assert [(r["ours"], r["baseline"], r["ratio"]) for r in rows] == [
        (100.0, 400.0, 0.25),
        (5.0, 3.0, pytest.approx(5 / 3, rel=1e-3)),
        (4.0, 2.0, 2.0),
    ]
    detail = json.loads(out.with_suffix(".training.json").read_text())
    assert detail["ratio"] == 0.25 and len(detail["variants"]) == 2
    assert "| DP-SGD | 16 (expected, Poisson) | 3 | 100 | 0.25 | 5.0 | 4.0 |" in (
        capsys.readouterr().out
    )


def test_tiny_he_section_has_every_system_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--sections", "he", "--he-numel", "20000", "--he-clients", "3", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert rows and all(tuple(r) == ROW_KEYS for r in rows)
    labels = (
        "nvflare-default",
        "xfl-packed",
        "xfl-packed masked, cohort 3",
        "bfv-lanes",
        "bfv-lanes masked, cohort 3",
    )
    for label in labels:
        tag = f"[{label} vs plaintext fp32]"
        mine = [r for r in rows if r["metric"].endswith(tag)]
        assert [r["unit"] for r in mine] == ["B/param", "params/s", "params/s", "params/s"]
        assert (
            "protect incl. masks" in mine[1]["metric"] and "ingest, 3 clients" in mine[2]["metric"]
        )
        assert "decrypt + unmask + unpack" in mine[3]["metric"]
        assert mine[0]["baseline"] == 4.0  # the float32 upload
        assert all(r["ours"] is not None and r["ours"] > 0 for r in mine)
    detail = json.loads(out.with_suffix(".he.json").read_text())
    got = {s["label"]: s for s in detail["systems"]}
    assert list(got) == ["plaintext fp32", *labels]
    for scheme in ("xfl-packed", "bfv-lanes"):  # masks cost no bytes
        masked = got[f"{scheme} masked, cohort 3"]["bytes_per_param"]
        assert masked == pytest.approx(got[scheme]["bytes_per_param"], rel=0.01)
    assert got["bfv-lanes"]["goals"]["max_bytes"] == 5.5
    assert got["bfv-lanes masked, cohort 3"]["goals"]["min_protect"] == 6e6
    assert got["xfl-packed masked, cohort 3"]["goals"]["max_bytes"] == 10.8
    assert got["nvflare-default"]["goals"] is None and got["plaintext fp32"]["decrypt"] is None
    # At 20k params the last ciphertext is mostly empty: the byte goals are missed.
    assert any(m.startswith("bytes") for m in got["bfv-lanes"]["misses"])
    assert "| system | B/param | protect M/s | ingest M/s (cohort) |" in printed
    assert "| bfv-lanes masked, cohort 3 | " in printed
    cmd = "OMP_NUM_THREADS=1 taskset -c 1 secure-xfl bench --sections he --he-numel 20000"
    assert f"Reproduce: `{cmd} --he-clients 3`" in printed


def test_he_masked_rows_check_the_unmasked_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    from secure_xfl.bench import he
    from secure_xfl.bench.bfv import System, make_system

    cfg = he.HEBenchConfig(numel=5000, cohorts=(3,), repeats=1)
    for name in ("xfl-packed", "bfv-lanes"):
        system = make_system(name, cfg.bfv_config())
        ok = he.measure_masked(system, cfg, 3)
        assert ok.masked and ok.decrypt_clients == 3 and ok.ingest.keys() == {3}
        honest = he.decrypt_masked

        def off_by_one_level(
            s: System, agg: list[bytes], n: int, honest: Any = honest
        ) -> np.ndarray:
            got: np.ndarray = honest(s, agg, n)
            got[17] += s.quant.step
            return got

        monkeypatch.setattr(he, "decrypt_masked", off_by_one_level)
        with pytest.raises(AssertionError, match="1 of 5000 values wrong"):
            he.measure_masked(system, cfg, 3)
        monkeypatch.undo()


def test_he_masks_cancel_only_over_the_whole_cohort() -> None:
    from secure_xfl.bench import he
    from secure_xfl.bench.bfv import make_system
    from secure_xfl.crypto.errors import CodecError

    cfg = he.HEBenchConfig(numel=5000, cohorts=(3,), repeats=1)
    system = make_system("bfv-lanes", cfg.bfv_config())
    masks = he.cohort_masks(3)
    ys = [np.zeros(cfg.numel) for _ in masks]
    ups = [
        he.protect_masked(system, y, np.random.default_rng(i), m)
        for i, (y, m) in enumerate(zip(ys, masks, strict=True))
    ]
    whole = he.decrypt_masked(system, system.ingest(ups), 3)
    assert np.max(np.abs(whole)) <= 3 * system.quant.step  # zeros, up to the rounding
    with pytest.raises(CodecError):  # two of three: the masks do not cancel
        he.decrypt_masked(system, system.ingest(ups[:2]), 2)
