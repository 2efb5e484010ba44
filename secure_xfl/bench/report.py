"""Benchmark rows ``{"metric", "unit", "ours", "baseline", "ratio"}`` as JSON and markdown."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

__all__ = ["ROW_KEYS", "Row", "markdown", "row", "stop_all", "write_json"]

ROW_KEYS = ("metric", "unit", "ours", "baseline", "ratio")


class Row(TypedDict):
    """One measured figure against its baseline."""

    metric: str
    unit: str
    ours: float | None
    baseline: float | None
    ratio: float | None


def _clean(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def row(metric: str, unit: str, ours: float | None, baseline: float | None) -> Row:
    """A row; ``ratio`` is ours / baseline (None when undefined)."""
    ratio = None
    if ours is not None and baseline and math.isfinite(ours) and math.isfinite(baseline):
        ratio = ours / baseline
    return Row(
        metric=metric, unit=unit, ours=_clean(ours), baseline=_clean(baseline), ratio=_clean(ratio)
    )


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 1e5:
        return f"{x:.3e}"
    return f"{x:.4g}"


def markdown(rows: Sequence[Row]) -> str:
    """A GitHub markdown table."""
    lines = ["| metric | unit | ours | baseline | ratio |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['metric']} | {r['unit']} | {_fmt(r['ours'])} | {_fmt(r['baseline'])} "
        f"| {_fmt(r['ratio'])} |"
        for r in rows
    ]
    return "\n".join(lines)


def write_json(path: Path, rows: Sequence[Row]) -> None:
    """Write the rows as a JSON list."""
    path.write_text(json.dumps(list(rows), indent=1) + "\n")


def stop_all(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM every benchmark child still running, then SIGKILL what outlives
    ``grace_s`` (a benchmark must never leave servers behind)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(the fastest wall time of ``repeats`` calls of ``fn``, its last result): the
    figure least disturbed by other jobs on a shared machine."""
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out
