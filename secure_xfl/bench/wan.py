"""WAN upload goodput: QUIC versus TLS/TCP across a delayed, lossy path (issue 17).

Sender and receiver run as separate processes in two fresh network namespaces
joined by the user-space forwarder of :mod:`secure_xfl.bench.wan_path` (RTT/2 per
direction, random loss, a 1 Gbit/s token bucket), so every byte really crosses the
impaired path. Per condition (0 ms / 0 % baseline through the same forwarder, then
RTT 50 ms at 0 % and 1 % loss) it uploads the same payload over:

- ``quic``: secure-xfl QUIC with mTLS (``RpcClient``/``RpcServer``, one connection),
  at the transport's default datagram size and at 1452 B;
- ``tls``: asyncio TLS 1.3 over TCP with mutual authentication (the baseline of
  :func:`secure_xfl.bench.transport.tls_tcp_goodput`);
- ``ours-tls``: secure-xfl's own TLS/TCP transport (``secure_xfl.transport.tcp``),
  when that module exists.

Goodput = payload bytes / time from the first byte written until the receiver's
acknowledgement arrives, in MB/s (10^6 B/s). Each transfer is time-boxed: one that
does not finish is reported as an upper bound (``payload / timeout``).

Run ``python -m secure_xfl.bench.wan [--mb 100]`` (as root) for a markdown table.
"""

from __future__ import annotations

import argparse
import json
import select
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secure_xfl.bench.report import Row, markdown, row
from secure_xfl.bench.transport import _provision
from secure_xfl.bench.wan_ends import has_ours_tls, kinds, quic_kind, upload_payload
from secure_xfl.bench.wan_path import PathSpec, WanPath, unavailable
from secure_xfl.transport import TransportConfig

__all__ = ["Measurement", "bench_rows", "has_ours_tls", "kinds", "rows_of", "run", "upload_payload"]

# ---------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class Measurement:
    """One upload across the path."""

    kind: str
    """``quic``, ``tls`` or ``ours-tls``."""
    datagram_size: int
    """QUIC max datagram size (0 for TCP)."""
    spec: PathSpec
    """The path it crossed."""
    mb_s: float
    """Goodput; an upper bound when ``timed_out``."""
    timed_out: bool
    """The transfer did not finish within the time box."""
    forwarder: dict[str, float]
    """The forwarder's counters for this transfer (packets forwarded, lost, dropped)."""


def _readline(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise RuntimeError("the receiver did not start in time")
    return proc.stdout.readline().strip()


def _measure_one(
    path: WanPath, spec: PathSpec, kind: str, mds: int, size: int, directory: Path, timeout_s: float
) -> Measurement:
    path.impair(spec)  # a fresh forwarder: its counters are this transfer's
    base = [sys.executable, "-m", "secure_xfl.bench.wan_ends"]
    common = ["--kind", kind, "--dir", str(directory), "--mds", str(mds)]
    common += ["--timeout", str(timeout_s), "--bytes", str(size)]
    serve_argv = path.exec_argv(1, [*base, "_serve", *common, "--host", path.addr[1]])
    server = subprocess.Popen(serve_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = _readline(server, 60)
        send = [*base, "_send", *common, "--host", path.addr[1], "--port", port]
        done = subprocess.run(
            path.exec_argv(0, send), capture_output=True, text=True, timeout=timeout_s + 120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{kind} sender failed: {done.stderr.strip()[-600:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            assert server.stdin is not None
            server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        path.stop_forwarder()  # collects this transfer's counters
    stats = dict(path.stats)
    mb_s = out["mb_s"] if not out["timed_out"] else size / timeout_s / 1e6
    return Measurement(kind, mds, spec, float(mb_s), bool(out["timed_out"]), stats)


def _label(m: Measurement) -> str:
    if m.kind.startswith("quic"):
        default = TransportConfig()
        cc, workers = quic_kind(m.kind)
        dflt = " (default)" if m.datagram_size == default.max_datagram_size else ""
        many = "s in parallel" if workers > 1 else ""
        return f"QUIC mTLS {workers} worker{many}, {cc}, datagram {m.datagram_size} B{dflt}"
    return "ours TLS/TCP" if m.kind == "ours-tls" else "asyncio TLS/TCP"


def _condition(spec: PathSpec) -> str:
    rate = f"{spec.rate_bps / 1e6:g} Mbit/s bucket" if spec.rate_bps else "no rate limit"
    return f"RTT {spec.rtt_s * 1000:g} ms, loss {spec.loss * 100:g} %, {rate}"


def run(
    mb: float = 100,
    *,
    rtt_ms: float = 50.0,
    losses: Sequence[float] = (0.0, 0.01),
    rate_mbit: float | None = 1000.0,
    timeout_s: float = 300.0,
    datagram_sizes: Sequence[int] | None = None,
    seed: int | None = 17,
    only: Sequence[str] | None = None,
) -> list[Measurement]:
    """Every transport across every condition, in one set of namespaces (root only)."""
    size = int(mb * 1_000_000)
    rate = rate_mbit * 1e6 if rate_mbit else None
    specs = [PathSpec(rtt_s=0.0, loss=0.0, rate_bps=rate, seed=seed)]
    specs += [PathSpec(rtt_s=rtt_ms / 1000, loss=p, rate_bps=rate, seed=seed) for p in losses]
    out: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp, WanPath() as path:
        _provision(Path(tmp))
        for spec in specs:
            for kind, mds in kinds(datagram_sizes):
                if only and kind not in only and kind != "tls":  # tls: every row's baseline
                    continue
                out.append(_measure_one(path, spec, kind, mds, size, Path(tmp), timeout_s))
    return out


def rows_of(measured: Sequence[Measurement], mb: float, timeout_s: float) -> list[Row]:
    """Each transport against asyncio TLS/TCP per condition, and the forwarder's ceiling."""
    rows: list[Row] = []
    specs = list(dict.fromkeys(m.spec for m in measured))
    for spec in specs:
        here = [m for m in measured if m.spec == spec]
        tls = next((m for m in here if m.kind == "tls"), None)
        base = tls.mb_s if tls is not None and not tls.timed_out else None
        for m in here:
            if m.kind == "tls":
                continue
            cap = f", timed out after {timeout_s:g} s: ≤" if m.timed_out else ""
            name = f"WAN upload {mb:g} MB, {_condition(spec)} [{_label(m)} vs asyncio TLS/TCP{cap}]"
            rows.append(row(name, "MB/s", m.mb_s, base))
    fastest = max((m for m in measured if m.spec == specs[0]), key=lambda m: m.mb_s, default=None)
    if fastest is not None:
        st = fastest.forwarder
        packets = st.get("ab_forwarded", 0) + st.get("ba_forwarded", 0)
        transfer_s = mb * 1e6 / fastest.mb_s / 1e6 if fastest.mb_s else 0
        pps = packets / transfer_s if transfer_s else None
        rows.append(row(f"WAN forwarder ceiling: best goodput at {_condition(specs[0])} "
                        f"[{_label(fastest)}]", "MB/s", fastest.mb_s, None))  # fmt: skip
        rows.append(row("WAN forwarder ceiling: packets/s forwarded (both directions) during "
                        "that transfer", "packets/s", pps, None))  # fmt: skip
    return rows


def bench_rows(
    mb: float = 100,
    *,
    rtt_ms: float = 50.0,
    losses: Sequence[float] = (0.0, 0.01),
    rate_mbit: float | None = 1000.0,
    timeout_s: float = 300.0,
    datagram_sizes: Sequence[int] | None = None,
) -> list[Row]:
    """The WAN section's rows, or one row saying why it was skipped."""
    reason = unavailable()
    if reason is not None:
        return [row(f"WAN benchmark skipped: {reason}", "", None, None)]
    measured = run(
        mb,
        rtt_ms=rtt_ms,
        losses=losses,
        rate_mbit=rate_mbit,
        timeout_s=timeout_s,
        datagram_sizes=datagram_sizes,
    )
    return rows_of(measured, mb, timeout_s)


def _notes(measured: Sequence[Measurement]) -> str:
    lines = ["| condition | transport | MB/s | forwarded a→b / b→a | lost | queue drops |"]
    lines.append("|---|---|---|---|---|---|")
    for m in measured:
        st = m.forwarder
        fwd = f"{st.get('ab_forwarded', 0):.0f} / {st.get('ba_forwarded', 0):.0f}"
        lost = st.get("ab_lost", 0) + st.get("ba_lost", 0)
        drops = st.get("ab_overflow", 0) + st.get("ba_overflow", 0)
        drops += st.get("tun_queue_drops", 0)
        mark = "≤ " if m.timed_out else ""
        lines.append(
            f"| {_condition(m.spec)} | {_label(m)} | {mark}{m.mb_s:.3g} | {fwd} "
            f"| {lost:.0f} | {drops:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the WAN table (and the per-transfer forwarder counters)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m secure_xfl.bench.wan", description=__doc__)
    p.add_argument("--mb", type=float, default=100, help="upload size in MB (default 100)")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--losses", default="0,1", help="loss rates in percent (default 0,1)")
    p.add_argument("--rate-mbit", type=float, default=1000.0, help="token bucket; 0 = none")
    p.add_argument("--timeout", type=float, default=300.0, help="time box per transfer, s")
    p.add_argument("--datagrams", help="QUIC datagram sizes (default: default and 1452)")
    p.add_argument("--kinds", help="only these transports, comma-separated (e.g. quic,quic-x4)")
    a = p.parse_args(argv)
    losses = tuple(float(x) / 100 for x in a.losses.split(",") if x)
    sizes = tuple(int(d) for d in a.datagrams.split(",")) if a.datagrams else None
    command = "python -m secure_xfl.bench.wan " + shlex.join(argv)
    reason = unavailable()
    if reason is not None:
        print(markdown([row(f"WAN benchmark skipped: {reason}", "", None, None)]))
        return 0
    started = time.monotonic()
    measured = run(
        a.mb,
        rtt_ms=a.rtt_ms,
        losses=losses,
        rate_mbit=a.rate_mbit or None,
        timeout_s=a.timeout,
        datagram_sizes=sizes,
        only=a.kinds.split(",") if a.kinds else None,
    )
    print(markdown(rows_of(measured, a.mb, a.timeout)))
    print("\n" + _notes(measured))
    print(f"\n`{command.strip()}` ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
