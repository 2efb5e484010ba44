"""One enrolled client cannot exhaust the real aggregator's memory.

DESIGN §2 promises: "One malicious client cannot … exhaust a server's memory (size
limits per message type from the announced layout, per-peer stream and connection
caps, a server-wide buffer budget)."

Before the limits, the aggregator's RpcServer buffered every request up to FIN with
1 GiB per stream, 64 streams per connection and no cap on connections: one enrolled
client opening 8 streams it never finished grew the process from 294 to 1515 MiB
(a legitimate upload was 0.2 MiB). Here mallory — a genuine enrolled client with its
own kit — opens as many connections and streams as the server takes, each the start
of a 1 GiB upload pushed as fast as the server reads and never finished (refused
streams are replaced at once), plus 4 MiB hellos, for ATTACK_S seconds. The
aggregator's resident memory is sampled throughout; afterwards the three honest
clients complete the round through the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from secure_xfl.kit import Kit
from secure_xfl.protocol import messages
from secure_xfl.transport import TooManyConnections
from secure_xfl.transport.errors import RemoteError, StreamReset, TransportError
from secure_xfl.transport.framing import decode_response
from secure_xfl.transport.rpc import RpcClient
from secure_xfl.transport.streams import Inbound
from tests.federation import federation
from tests.security import live

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NUMEL = 3000
CONNECTIONS = 10  # attempted; the server keeps max_connections_per_peer (4)
STREAMS = 16  # kept open per connection; the server serves max_concurrent_streams (8)
ATTACK_S = 15.0
CHUNK = 64 << 10
#: Growth allowed besides 2 uploads. What one peer can make the server hold by
#: design is max_connections_per_peer x max_concurrent_streams = 32 claims of one
#: upload limit (~0.2 MiB each here, ~7 MiB), plus per-connection aioquic state
#: (packet-number spaces, ACK ranges, up to 128 streams each, send buffers of
#: error replies), one receive batch of datagrams, log records and allocator
#: fragmentation (pymalloc arenas are not returned at once). 64 MiB covers that
#: with margin while being ~20x below what the unbounded server grew by.
SLACK_MIB = 64


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Sampler(threading.Thread):
    """Peak VmRSS of a process, polled every 20 ms until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, rss_kib(pid), 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self.samples += 1
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def huge_upload_head() -> bytes:
    """The first bytes of an upload whose update declares 1 GiB (bin32 header)."""
    full = messages.encode("upload", round=0, update=b"\0" * 16)
    return full[: full.index(b"\xc4\x10")] + b"\xc6" + (1 << 30).to_bytes(4, "big")


def open_stream(client: RpcClient, data: bytes) -> Inbound:
    proto = client._protocol
    assert proto is not None
    sid = proto._quic.get_next_available_stream_id()
    proto._quic.send_stream_data(sid, data)
    proto.transmit()
    state = proto.open_inbound(sid, 1 << 20)
    state.watched = False
    return state


def outcome(state: Inbound) -> str:
    assert state.done is not None and state.done.done()
    exc = state.done.exception()
    if exc is None:
        try:
            decode_response(state.done.result())
        except RemoteError as err:
            return err.code
        return "ok"
    if isinstance(exc, StreamReset):
        return f"reset:{exc.error_code:#x}"
    return getattr(exc, "code", type(exc).__name__)


async def flood(client: RpcClient, until: float, seen: Counter[str]) -> None:
    """Keep STREAMS never-finished upload streams going, pushing as fast as acked."""
    proto = client._protocol
    assert proto is not None
    head, chunk = huge_upload_head(), bytes(CHUNK)
    streams = [open_stream(client, head) for _ in range(STREAMS)]
    while time.monotonic() < until and proto.closed_error is None:
        for i, state in enumerate(streams):
            assert state.done is not None
            if state.done.done():
                seen[f"stream:{outcome(state)}"] += 1
                proto.inbound.pop(state.stream_id, None)
                streams[i] = open_stream(client, head)  # replace it at once
            elif state.stream_id not in proto.send_blocked and (
                proto._unacked(state.stream_id) < 1 << 20
            ):
                with contextlib.suppress(AssertionError, ValueError):  # reset meanwhile
                    proto._quic.send_stream_data(state.stream_id, chunk)
        proto.transmit()
        await asyncio.sleep(0.005)
    seen["stream:open_at_end"] += sum(
        1 for s in streams if s.done is not None and not s.done.done()
    )


async def big_hellos(client: RpcClient, until: float, seen: Counter[str]) -> None:
    payload = messages.encode("hello", pad=bytes(4 << 20))
    while time.monotonic() < until:
        seen[f"hello:{(await live.call(client, payload, timeout=10)).code}"] += 1
        await asyncio.sleep(0.2)


async def attack(kit: Kit, port: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    clients: list[RpcClient] = []
    for _ in range(CONNECTIONS):
        # QUIC whatever the kit's transport: the flood drives QUIC streams directly.
        c = live.connect(kit, "aggregator", port, protocol="quic")
        assert isinstance(c, RpcClient)
        try:
            await c.connect()
            clients.append(c)
            seen["connection:accepted"] += 1
        except TooManyConnections as exc:
            seen[f"connection:{exc.code}"] += 1
    until = time.monotonic() + ATTACK_S
    try:
        await asyncio.gather(
            *(flood(c, until, seen) for c in clients),
            *(big_hellos(c, until, seen) for c in clients),
        )
    finally:
        for c in clients:
            await c.close()
    return seen


async def hear_done(kit: Kit, port: int) -> None:
    """Ask 'task' like a client until the run is over (so the aggregator need not
    linger for mallory)."""
    async with live.connect(kit, "aggregator", port) as c:
        await live.hear_done(c, after=0)


def test_one_enrolled_client_cannot_exhaust_the_aggregator_memory(tmp_path: Path) -> None:
    root = live.provision_run(tmp_path, (*live.HONEST, "mallory"), min_clients=3)
    mallory = Kit.load(root / "client-mallory")
    model = live.zero_model(NUMEL)
    upload = messages.encode(
        "upload", round=0, update=live.honest_update(root, "mallory", 0, model)
    )

    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")
        pid = fed.procs["aggregator"].popen.pid

        async def warm_up() -> None:  # connection, TLS and handler paths allocated once
            async with live.connect(mallory, "aggregator", port) as c:
                assert (await live.call(c, messages.encode("hello"))).ok

        live.run(warm_up())
        time.sleep(1.0)
        before = rss_kib(pid)
        sampler = Sampler(pid)
        sampler.start()
        try:
            seen = live.run(attack(mallory, port))
        except TransportError as exc:  # pragma: no cover - diagnostic
            raise AssertionError(f"{exc}\n{fed.logs()}") from exc
        finally:
            peak = sampler.stop()
        time.sleep(1.0)
        after = rss_kib(pid)
        assert fed.procs["aggregator"].popen.poll() is None, fed.logs()

        # mallory's own genuine upload is still accepted (the round then needs no
        # deadline), and the honest clients complete the round.
        legit = live.run(live.call_once(mallory, "aggregator", port, upload))
        assert legit.ok, legit
        for c in live.HONEST:
            fed.start_client(c)
        live.run(asyncio.wait_for(hear_done(mallory, port), 240))
        assert fed.wait("aggregator", timeout=180) == 0, fed.logs()
        for c in live.HONEST:
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
        agg_log = fed.procs["aggregator"].text()

    growth_mib = (peak - before) / 1024
    upload_mib = len(upload) / 2**20
    print(
        f"\naggregator VmRSS before {before / 1024:.1f} MiB, peak during attack "
        f"{peak / 1024:.1f} MiB ({sampler.samples} samples), 1 s after "
        f"{after / 1024:.1f} MiB; growth {growth_mib:.1f} MiB; one legitimate upload "
        f"{upload_mib:.3f} MiB; bound {2 * upload_mib + SLACK_MIB:.1f} MiB\n"
        f"attack outcomes: {dict(sorted(seen.items()))}"
    )
    assert growth_mib < 2 * upload_mib + SLACK_MIB
    # Every limit was hit and answered with its typed code.
    assert seen["connection:too_many_connections"] == CONNECTIONS - 4, seen
    assert seen["stream:busy"] > 0, seen
    assert seen["stream:message_too_large"] > 0, seen
    assert seen["hello:message_too_large"] + seen["hello:busy"] > 0, seen
    assert not [k for k in seen if k.endswith((":ok", ":internal"))], seen
    assert "max_connections_per_peer=4" in agg_log
    assert (root / "agg-out" / "global-1.npy").exists()
