"""An impaired IP path between two network namespaces: delay, random loss, a rate limit.

This kernel has no ``sch_netem`` (so no ``tc netem``) and no nftables, so the path is
made here: a TUN device in each namespace, joined by a user-space forwarder that holds
every packet for RTT/2 per direction, drops each with probability ``loss`` and paces
them through a token bucket. Both transports then cross exactly the same path.

The pure parts (:class:`TokenBucket`, :class:`DelayLine`) need no privileges and are
unit tested; :class:`WanPath` needs root, ``ip netns`` and ``/dev/net/tun``, and
:func:`unavailable` says why it cannot run where it cannot.

The forwarder is pure Python in its own process (``python -m
secure_xfl.bench.wan_path``): one ``read``/``write`` system call per packet, so it has
a packet-rate ceiling of its own, which the WAN benchmark measures and states.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import random
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["DelayLine", "PathSpec", "TokenBucket", "WanPath", "tcp_connect_rtt", "unavailable"]

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READ_BATCH = 512  # packets read per descriptor per wake-up before serving the other side


@dataclass(frozen=True)
class PathSpec:
    """What the forwarder does to every packet, the same in both directions."""

    rtt_s: float = 0.05
    """Round-trip propagation delay; each direction holds a packet for half of it."""
    loss: float = 0.0
    """Probability that a packet is dropped, drawn independently per packet and per
    direction (ACKs are lost too, as on a real lossy link)."""
    rate_bps: float | None = 1e9
    """Token-bucket rate per direction in bit/s (None: unlimited). The forwarder's own
    ceiling may be lower; the benchmark states which one binds."""
    burst_bytes: int = 64 << 10
    """Token-bucket depth: how many bytes may leave back to back after an idle spell."""
    queue_bytes: int = 4 << 20
    """Bottleneck buffer: a packet that would wait longer than ``queue_bytes / rate``
    for tokens is tail-dropped, like a router's full queue."""
    max_inflight_bytes: int = 64 << 20
    """Hard memory bound per direction on everything held (waiting and propagating)."""
    seed: int | None = None
    """Seed of the loss draws (None: a fresh one)."""


class TokenBucket:
    """Departure times through a ``rate_bps`` link with a ``burst_bytes`` bucket.

    Packets leave in arrival order; :meth:`depart` returns when a packet of ``size``
    bytes arriving at ``now`` leaves (never before ``now``, never before the previous
    packet's departure).
    """

    def __init__(self, rate_bps: float, burst_bytes: int) -> None:
        if not rate_bps > 0 or burst_bytes < 1:
            raise ValueError("rate_bps and burst_bytes must be positive")
        self.rate = rate_bps / 8.0  # bytes per second
        self.burst = float(burst_bytes)
        self._tokens = float(burst_bytes)
        self._t = -float("inf")  # time of the last departure

    def backlog_s(self, now: float) -> float:
        """How long a packet arriving now waits behind those already scheduled."""
        return max(0.0, self._t - now)

    def depart(self, now: float, size: int) -> float:
        """Schedule one packet; returns its departure time."""
        t = max(now, self._t)
        if self._t != -float("inf"):
            self._tokens = min(self.burst, self._tokens + (t - self._t) * self.rate)
        else:
            self._tokens = self.burst
        if self._tokens < size:
            t += (size - self._tokens) / self.rate
            self._tokens = float(size)
        self._tokens -= size
        self._t = t
        return t


class DelayLine:
    """One direction of the path: loss, then the bottleneck, then propagation delay.

    Packets are released in FIFO order no earlier than ``arrival + rtt/2`` (plus any
    wait for tokens). Release times never decrease, so a deque keyed by release time
    is the whole scheduler.
    """

    def __init__(self, spec: PathSpec, rng: random.Random | None = None) -> None:
        if not 0.0 <= spec.loss < 1.0 or spec.rtt_s < 0:
            raise ValueError("loss must be in [0, 1) and rtt_s not negative")
        self.spec = spec
        self.delay = spec.rtt_s / 2.0
        self.rng = rng or random.Random(spec.seed)  # noqa: S311 - a simulation, not crypto
        self.bucket = TokenBucket(spec.rate_bps, spec.burst_bytes) if spec.rate_bps else None
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._held = 0
        self.forwarded = 0
        self.lost = 0
        self.overflow = 0
        self.bytes_out = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def held_bytes(self) -> int:
        """Bytes currently held (waiting for tokens or propagating)."""
        return self._held

    def push(self, packet: bytes, now: float) -> bool:
        """Accept one packet arriving at ``now``; False when it was dropped."""
        if self.spec.loss and self.rng.random() < self.spec.loss:
            self.lost += 1
            return False
        size = len(packet)
        if self._held + size > self.spec.max_inflight_bytes:
            self.overflow += 1
            return False
        departure = now
        if self.bucket is not None:
            if self.bucket.backlog_s(now) * self.bucket.rate + size > self.spec.queue_bytes:
                self.overflow += 1
                return False
            departure = self.bucket.depart(now, size)
        release = departure + self.delay
        if self._queue and release < self._queue[-1][0]:
            release = self._queue[-1][0]  # float rounding must not reorder packets
        self._queue.append((release, packet))
        self._held += size
        return True

    def next_release(self) -> float | None:
        """Release time of the oldest packet held (None when empty)."""
        return self._queue[0][0] if self._queue else None

    def pop_due(self, now: float) -> list[bytes]:
        """Every packet whose release time has come, oldest first."""
        out: list[bytes] = []
        queue = self._queue
        while queue and queue[0][0] <= now:
            packet = queue.popleft()[1]
            self._held -= len(packet)
            out.append(packet)
        self.forwarded += len(out)
        self.bytes_out += sum(map(len, out))
        return out


# ---------------------------------------------------------------------------- the forwarder


def _tun_open(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        ifr = struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _pump(fds: tuple[int, int], lines: tuple[DelayLine, DelayLine], stop: list[bool]) -> None:
    """Move packets fd[i] -> lines[i] -> fd[1-i] until ``stop[0]``."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    clock = time.monotonic
    while not stop[0]:
        due = [t for t in (lines[0].next_release(), lines[1].next_release()) if t is not None]
        wait_ms = 200.0 if not due else max(0.0, (min(due) - clock()) * 1000.0)
        ready = poller.poll(wait_ms) if wait_ms >= 0.05 else poller.poll(0)
        for fd, _ in ready:
            side = 0 if fd == fds[0] else 1
            line = lines[side]
            for _ in range(_READ_BATCH):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                line.push(packet, clock())
        now = clock()
        for side in (0, 1):
            out = fds[1 - side]
            for packet in lines[side].pop_due(now):
                try:
                    os.write(out, packet)
                except OSError:  # the kernel refused it (e.g. device going down): a drop
                    lines[side].overflow += 1


def _forward_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m secure_xfl.bench.wan_path")
    p.add_argument("--ns", nargs=2, required=True)
    p.add_argument("--tun", nargs=2, required=True)
    p.add_argument("--addr", nargs=2, required=True, help="CIDR addresses, e.g. 10.9.1.1/30")
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--rate-mbit", type=float, default=0.0, help="0: unlimited")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    spec = PathSpec(
        rtt_s=a.rtt_ms / 1000.0,
        loss=a.loss,
        rate_bps=a.rate_mbit * 1e6 if a.rate_mbit > 0 else None,
        seed=a.seed,
    )
    stop = [False]

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The TUNs are made here, in the root namespace, then moved: their descriptors
    # stay ours, and the devices vanish with this process (they are not persistent).
    fds = (_tun_open(a.tun[0]), _tun_open(a.tun[1]))
    for ns, tun, addr in zip(a.ns, a.tun, a.addr, strict=True):
        _ip("link", "set", "dev", tun, "netns", ns)
        _ip("-n", ns, "link", "set", "dev", tun, "mtu", "1500", "txqueuelen", "10000", "up")
        _ip("-n", ns, "addr", "add", addr, "dev", tun)
    rng = random.Random(spec.seed)  # noqa: S311 - a simulation, not crypto
    lines = (DelayLine(spec, rng), DelayLine(spec, rng))
    print("ready", flush=True)
    started = time.monotonic()
    _pump(fds, lines, stop)
    elapsed = time.monotonic() - started
    stats = {
        f"{d}_{k}": getattr(line, k)
        for d, line in zip(("ab", "ba"), lines, strict=True)
        for k in ("forwarded", "lost", "overflow", "bytes_out")
    }
    stats["elapsed_s"] = elapsed
    print(json.dumps(stats), flush=True)
    return 0


# ---------------------------------------------------------------------------- namespaces


def unavailable() -> str | None:
    """Why :class:`WanPath` cannot run here (None when it can)."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    probe = f"sxfl-probe-{secrets.token_hex(4)}"
    try:
        done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30)
    return None


class WanPath:
    """Two fresh namespaces joined by the forwarder, torn down on exit.

    ``with WanPath() as path:`` creates namespaces ``path.ns`` (sender side first);
    :meth:`impair` (re)starts the forwarder with a :class:`PathSpec`; the receiver
    listens on ``path.addr[1]`` in ``path.ns[1]``. Exit (also by SIGINT or SIGTERM)
    stops the forwarder and deletes both namespaces.
    """

    def __init__(self) -> None:
        tag = secrets.token_hex(4)
        self.ns = (f"sxfl-wan-{tag}-s", f"sxfl-wan-{tag}-r")
        self.tun = (f"sxw{tag}s", f"sxw{tag}r")
        octet = 1 + int(tag[:2], 16) % 250
        self.addr = (f"10.213.{octet}.1", f"10.213.{octet}.2")
        self.spec: PathSpec | None = None
        self.stats: dict[str, float] = {}
        self._forwarder: subprocess.Popen[str] | None = None
        self._old_term: object = None

    def __enter__(self) -> WanPath:
        self._old_term = signal.getsignal(signal.SIGTERM)
        if self._old_term in (signal.SIG_DFL, None):

            def on_term(_sig: int, _frame: FrameType | None) -> None:
                raise KeyboardInterrupt("SIGTERM")  # so the finally/exit below runs

            signal.signal(signal.SIGTERM, on_term)
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "dev", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def exec_argv(self, side: int, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``side`` (0 sender, 1 receiver)."""
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def impair(self, spec: PathSpec) -> None:
        """(Re)start the forwarder with ``spec``; returns once packets flow."""
        self._stop_forwarder()
        rate = spec.rate_bps / 1e6 if spec.rate_bps else 0.0
        argv = [sys.executable, "-m", "secure_xfl.bench.wan_path", "--ns", *self.ns]
        argv += ["--tun", *self.tun, "--addr", *(f"{a}/30" for a in self.addr)]
        argv += ["--rtt-ms", str(spec.rtt_s * 1000), "--loss", str(spec.loss)]
        argv += ["--rate-mbit", str(rate)]
        if spec.seed is not None:
            argv += ["--seed", str(spec.seed)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self._forwarder = proc
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            self._stop_forwarder()
            raise RuntimeError("the packet forwarder did not start")
        self.spec = spec

    def _tun_drops(self) -> int:
        # Packets the kernel dropped at a TUN's queue because the forwarder fell behind.
        total = 0
        for ns, tun in zip(self.ns, self.tun, strict=True):
            argv = ["ip", "-j", "-s", "-n", ns, "link", "show", "dev", tun]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            try:
                total += int(json.loads(done.stdout)[0]["stats64"]["tx"]["dropped"])
            except (ValueError, LookupError, TypeError):
                pass
        return total

    def stop_forwarder(self) -> None:
        """Stop the forwarder; its counters for the last period land in ``stats``."""
        self._stop_forwarder()

    def _stop_forwarder(self) -> None:
        proc, self._forwarder = self._forwarder, None
        if proc is None:
            return
        drops = self._tun_drops() if proc.poll() is None else 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        try:
            self.stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except (ValueError, IndexError):
            self.stats = {}
        self.stats["tun_queue_drops"] = drops

    def close(self) -> None:
        """Stop the forwarder and delete both namespaces (idempotent)."""
        try:
            self._stop_forwarder()
        finally:
            for ns in self.ns:
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]
                self._old_term = None


_RTT_PROBE = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
t = time.perf_counter(); s.sendall(b"x"); s.recv(1); print(time.perf_counter() - t)
"""
_ECHO = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.sendall(c.recv(1)); c.close()
"""


def tcp_connect_rtt(path: WanPath) -> float:
    """One request/response over TCP between the namespaces, in seconds (≈ one RTT)."""
    echo = subprocess.Popen(
        path.exec_argv(1, [sys.executable, "-c", _ECHO, path.addr[1]]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None
        port = echo.stdout.readline().strip()
        argv = path.exec_argv(0, [sys.executable, "-c", _RTT_PROBE, path.addr[1], port])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        return float(done.stdout.strip())
    finally:
        echo.kill()
        echo.wait()


if __name__ == "__main__":
    sys.exit(_forward_main(sys.argv[1:]))
