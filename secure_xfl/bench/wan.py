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
import asyncio
import importlib
import importlib.util
import inspect
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
from typing import Any

import msgpack

from secure_xfl.bench.report import Row, markdown, row
from secure_xfl.bench.transport import _CHUNK, _provision, _ssl_context, _tls, count_upload
from secure_xfl.bench.wan_path import PathSpec, WanPath, unavailable
from secure_xfl.crypto import pki
from secure_xfl.transport import RpcClient, RpcServer, TransportConfig

__all__ = ["Measurement", "bench_rows", "has_ours_tls", "kinds", "rows_of", "run", "upload_payload"]

_OURS_TLS = "secure_xfl.transport.tcp"


def has_ours_tls() -> bool:
    """Whether secure-xfl's own TLS/TCP transport is installed."""
    return importlib.util.find_spec(_OURS_TLS) is not None


def kinds(datagram_sizes: Sequence[int] | None = None) -> list[tuple[str, int]]:
    """(transport, datagram size) pairs measured per condition; size 0 = not QUIC."""
    default = TransportConfig().max_datagram_size
    sizes = sorted({default, 1452} if datagram_sizes is None else set(datagram_sizes))
    out = [("quic", s) for s in sizes] + [("quic-cubic", 1452), ("tls", 0)]
    return out + ([("ours-tls", 0)] if has_ours_tls() else [])


def upload_payload(size: int) -> bytes:
    """Exactly ``size`` bytes shaped like a request (``{"t": "upload", "b": <zeros>}``),
    since servers peek a request's type from its first bytes."""
    overhead = len(msgpack.packb({"t": "upload", "b": bytes(1 << 16)})) - (1 << 16)
    if size < (1 << 16) + overhead:
        raise ValueError("the upload must be at least 64 KiB")
    payload = msgpack.packb({"t": "upload", "b": bytes(size - overhead)})
    assert len(payload) == size
    return bytes(payload)


def _classes(kind: str) -> tuple[Any, Any]:
    if kind.startswith("quic"):
        return RpcServer, RpcClient
    module = importlib.import_module(_OURS_TLS)
    return module.TlsRpcServer, module.TlsRpcClient


def _config(kind: str, mds: int, timeout_s: float) -> TransportConfig:
    # A lossy transfer may be slow but is never stalled: keep the stream alive.
    stream = max(60.0, timeout_s)
    if kind == "quic-cubic":
        return TransportConfig(
            max_datagram_size=mds, stream_timeout_s=stream, congestion_control="cubic"
        )
    if mds:
        return TransportConfig(max_datagram_size=mds, stream_timeout_s=stream)
    return TransportConfig(stream_timeout_s=stream)


# ---------------------------------------------------------------------------- endpoints


async def _serve(kind: str, directory: Path, host: str, mds: int, timeout_s: float) -> None:
    """Receiver: print the bound port, answer each upload with its length, until
    stdin closes."""
    loop = asyncio.get_running_loop()
    if kind == "tls":
        ctx = _ssl_context(directory, "aggregator", server=True)
        tcp = await asyncio.start_server(count_upload, host, 0, ssl=ctx)
        print(tcp.sockets[0].getsockname()[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        tcp.close()
        return

    async def sink(_peer: pki.PeerIdentity, payload: bytes) -> bytes:
        return len(payload).to_bytes(8, "big")

    server_cls, _ = _classes(kind)
    args: dict[str, Any] = {
        "tls": _tls(directory, "aggregator"),
        "allowed_roles": ["client"],
        "handler": sink,
        "config": _config(kind, mds, timeout_s),
    }
    if "budget" in inspect.signature(server_cls).parameters:
        # The TLS server built by RpcServer itself: it shares the QUIC server's bounds.
        quic = RpcServer(**args)
        args |= {"max_message_bytes": quic.max_message_bytes}
        args |= {"limit_for": quic.limit_for, "budget": quic.budget}
    server = server_cls(**args)
    print(await server.start(host, 0), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await server.close()


async def _send(
    kind: str, directory: Path, host: str, port: int, mds: int, size: int, timeout_s: float
) -> dict[str, Any]:
    """Sender: one upload of ``size`` bytes, timed from the first byte written."""
    payload = upload_payload(size)
    if kind == "tls":
        ctx = _ssl_context(directory, "client", server=False)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        start = time.perf_counter()

        async def tcp_upload() -> int:
            view = memoryview(payload)
            writer.write(size.to_bytes(8, "big"))
            for offset in range(0, size, _CHUNK):
                writer.write(view[offset : offset + _CHUNK])
                await writer.drain()
            return int.from_bytes(await reader.readexactly(8), "big")

        try:
            got = await asyncio.wait_for(tcp_upload(), timeout_s)
        except TimeoutError:
            return {"timed_out": True, "elapsed_s": time.perf_counter() - start}
        finally:
            writer.close()
        elapsed = time.perf_counter() - start
    else:
        _, client_cls = _classes(kind)
        async with client_cls(
            tls=_tls(directory, "client"),
            server_role="aggregator",
            host=host,
            port=port,
            config=_config(kind, mds, timeout_s),
        ) as client:
            start = time.perf_counter()
            try:
                reply = await asyncio.wait_for(client.call(payload), timeout_s)
            except TimeoutError:
                return {"timed_out": True, "elapsed_s": time.perf_counter() - start}
            elapsed = time.perf_counter() - start
        got = int.from_bytes(reply, "big")
    if got != size:
        raise RuntimeError(f"receiver acknowledged {got} of {size} bytes")
    return {"timed_out": False, "elapsed_s": elapsed, "mb_s": size / elapsed / 1e6}


def _endpoint_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m secure_xfl.bench.wan _serve|_send")
    p.add_argument("role", choices=("_serve", "_send"))
    p.add_argument("--kind", required=True, choices=("quic", "quic-cubic", "tls", "ours-tls"))
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mds", type=int, default=0)
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    if a.role == "_serve":
        asyncio.run(_serve(a.kind, a.dir, a.host, a.mds, a.timeout))
        return 0
    out = asyncio.run(_send(a.kind, a.dir, a.host, a.port, a.mds, a.bytes, a.timeout))
    print(json.dumps(out), flush=True)
    return 0


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
    base = [sys.executable, "-m", "secure_xfl.bench.wan"]
    common = ["--kind", kind, "--dir", str(directory), "--mds", str(mds)]
    common += ["--timeout", str(timeout_s)]
    serve_argv = path.exec_argv(1, [*base, "_serve", *common, "--host", path.addr[1]])
    server = subprocess.Popen(serve_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = _readline(server, 60)
        send = [*base, "_send", *common, "--host", path.addr[1], "--port", port]
        send += ["--bytes", str(size)]
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
        cc = "cubic" if m.kind == "quic-cubic" else default.congestion_control
        dflt = " (default)" if m.datagram_size == default.max_datagram_size else ""
        return f"QUIC mTLS 1 worker, {cc}, datagram {m.datagram_size} B{dflt}"
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
    if argv and argv[0] in ("_serve", "_send"):
        return _endpoint_main(argv)
    p = argparse.ArgumentParser(prog="python -m secure_xfl.bench.wan", description=__doc__)
    p.add_argument("--mb", type=float, default=100, help="upload size in MB (default 100)")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--losses", default="0,1", help="loss rates in percent (default 0,1)")
    p.add_argument("--rate-mbit", type=float, default=1000.0, help="token bucket; 0 = none")
    p.add_argument("--timeout", type=float, default=300.0, help="time box per transfer, s")
    p.add_argument("--datagrams", help="QUIC datagram sizes (default: default and 1452)")
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
    )
    print(markdown(rows_of(measured, a.mb, a.timeout)))
    print("\n" + _notes(measured))
    print(f"\n`{command.strip()}` ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
