"""The load generator's figures: /proc sampling, per-round rows, summary and table.

Pure helpers (no processes started here) so they can be unit-tested.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProcStats", "parse_cpu", "parse_status", "progress", "round_row", "split",
           "summarise", "table"]  # fmt: skip

_MB = 1e6


def split(names: Sequence[str], workers: int) -> list[list[str]]:
    """Deal ``names`` round-robin to ``workers`` non-empty groups."""
    groups = [list(names[i::workers]) for i in range(min(workers, len(names)))]
    return [g for g in groups if g]


# -- /proc -------------------------------------------------------------------------------
_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_status(text: str) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (kB) from a ``/proc/PID/status`` text."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM") and rest.split():
            out[key] = int(rest.split()[0])
    return out


def parse_cpu(stat: str, tck: int = _TCK) -> float:
    """utime + stime seconds from a ``/proc/PID/stat`` line (the command name may hold
    spaces and parentheses, so fields are counted after its last ``)``)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / tck


@dataclass
class ProcStats:
    """One process's RSS and CPU, sampled."""

    pid: int
    rss_mb: float = 0.0
    peak_mb: float = 0.0
    """Largest RSS seen since the last round boundary."""
    cpu_s: float = 0.0
    hwm_mb: float = 0.0
    """The kernel's high-water mark of RSS (``VmHWM``) over the process's life."""

    def sample(self) -> None:
        """Read /proc (a process that has exited keeps its last figures)."""
        try:
            status = parse_status(Path(f"/proc/{self.pid}/status").read_text())
            cpu = parse_cpu(Path(f"/proc/{self.pid}/stat").read_text())
        except (OSError, ValueError, IndexError):
            return
        self.cpu_s = cpu
        if "VmRSS" not in status:  # a zombie (exited, not yet reaped) has no memory lines
            return
        self.rss_mb = status["VmRSS"] / 1024
        self.hwm_mb = status.get("VmHWM", 0) / 1024
        self.peak_mb = max(self.peak_mb, self.rss_mb)


def round_row(line: dict[str, Any], agg: ProcStats, kh: ProcStats, prev: dict[str, float],
               clients_cpu: float) -> dict[str, Any]:  # fmt: skip
    seconds = float(line.get("seconds") or 0.0)
    up = int(line.get("bytes_up") or 0)
    row = {
        "round": int(line["round"]),
        "seconds": seconds,
        "participants": len(line.get("participants") or ()),
        "bytes_up": up,
        "ingest_mb_s": up / _MB / seconds if seconds > 0 else None,
        "aggregator_rss_mb": round(agg.rss_mb, 1),
        "aggregator_peak_mb": round(agg.peak_mb, 1),
        "aggregator_cpu_s": round(agg.cpu_s - prev["agg"], 2),
        "keyholder_rss_mb": round(kh.rss_mb, 1),
        "keyholder_peak_mb": round(kh.peak_mb, 1),
        "keyholder_cpu_s": round(kh.cpu_s - prev["kh"], 2),
        "clients_cpu_s": round(clients_cpu - prev["clients"], 2),
    }
    prev.update(agg=agg.cpu_s, kh=kh.cpu_s, clients=clients_cpu)
    agg.peak_mb, kh.peak_mb = agg.rss_mb, kh.rss_mb
    return row


def progress(row: dict[str, Any], rounds: int) -> str:
    """One line per round."""
    ingest = row["ingest_mb_s"]
    return (
        f"round {row['round'] + 1}/{rounds}: {row['seconds']:.1f} s, "
        f"{row['participants']} clients, {row['bytes_up'] / _MB:.1f} MB up "
        f"({'—' if ingest is None else f'{ingest:.1f}'} MB/s); aggregator "
        f"{row['aggregator_rss_mb']:.0f} MB (peak {row['aggregator_peak_mb']:.0f}), "
        f"{row['aggregator_cpu_s']:.1f} s CPU; key holder {row['keyholder_rss_mb']:.0f} MB, "
        f"{row['keyholder_cpu_s']:.1f} s CPU; clients {row['clients_cpu_s']:.1f} s CPU"
    )


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the steady rounds (round 0 includes start-up and N handshakes, so it
    is left out when there are later rounds) and peaks over all rounds."""
    steady = list(rows[1:] if len(rows) > 1 else rows)
    if not steady:
        return {}

    def med(key: str) -> float | None:
        vals = [r[key] for r in steady if r[key] is not None]
        return statistics.median(vals) if vals else None

    return {
        "rounds": len(rows),
        "round_s": med("seconds"),
        "ingest_mb_s": med("ingest_mb_s"),
        "upload_mb": (med("bytes_up") or 0.0) / _MB,
        "aggregator_cpu_s": med("aggregator_cpu_s"),
        "keyholder_cpu_s": med("keyholder_cpu_s"),
        "aggregator_peak_mb": max(r["aggregator_peak_mb"] for r in rows),
        "keyholder_peak_mb": max(r["keyholder_peak_mb"] for r in rows),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rounds."""
    head = ("| round | s | clients | MB up | MB/s | agg RSS MB | agg peak | agg CPU s "
            "| kh RSS MB | kh CPU s | clients CPU s |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ing = r["ingest_mb_s"]
        lines.append(
            f"| {r['round']} | {r['seconds']:.2f} | {r['participants']} | "
            f"{r['bytes_up'] / _MB:.1f} | {'—' if ing is None else f'{ing:.1f}'} | "
            f"{r['aggregator_rss_mb']:.0f} | {r['aggregator_peak_mb']:.0f} | "
            f"{r['aggregator_cpu_s']:.1f} | {r['keyholder_rss_mb']:.0f} | "
            f"{r['keyholder_cpu_s']:.1f} | {r['clients_cpu_s']:.1f} |"
        )
    return "\n".join(lines)
