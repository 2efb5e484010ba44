"""A tiny run of ``secure-xfl bench``: the row schema, not the speeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
