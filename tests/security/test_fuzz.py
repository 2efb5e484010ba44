"""Fuzzing both server roles with hostile messages over real mTLS QUIC.

DESIGN §2 promises: "Bad input of any kind gets a clear error, never a crash, a hang
or an unbounded allocation (size limits on every message and field)." and "…the
server keeps serving and loses nothing it had accepted."

``SECURE_XFL_FUZZ_N`` messages (default 500 in CI; the documented full run is
10000) from ``tests/security/fuzzing.py`` go to the real aggregator process (from an
enrolled client's identity) and to the real key-holder process (from the
aggregator's identity). Every reply must be a typed error — never ``internal`` (an
unhandled exception), never a timeout — apart from the few payloads that are
semantically the valid message; the server's peak memory must stay bounded; and
afterwards the honest clients' round through the same processes must be exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.crypto.envelope import EncryptedAggregate, ProtectedUpdate
from secure_xfl.kit import Kit
from secure_xfl.privacy.ledger.schema import outcome_of
from secure_xfl.protocol import messages
from tests.federation import Federation, federation
from tests.security import fuzzing, live

pytestmark = pytest.mark.timeout(max(300, fuzzing.fuzz_count() // 10 + 240))

NUMEL = 1000
LIMIT = 4 * 1024 * 1024
#: Peak-RSS growth allowed while fuzzing (a 2**32 allocation would blow far past it).
RSS_GROWTH_KIB = 256 * 1024
WORKERS = 8


def _decoded(payload: bytes) -> dict[str, object] | None:
    try:
        return messages.decode(payload)
    except Exception:
        return None


async def _fuzz(
    kit: Kit,
    role: str,
    port: int,
    cases: Iterator[tuple[str, bytes]],
    accept: Callable[[bytes], bool],
) -> tuple[Counter[str], list[str], float]:
    """Send every case; returns (outcome counts, problems, slowest reply in s)."""
    counts: Counter[str] = Counter()
    problems: list[str] = []
    slowest = 0.0
    lock = asyncio.Lock()
    conn = live.connect(kit, role, port)
    await conn.connect()

    async def worker() -> None:
        nonlocal conn, slowest
        for family, payload in cases:
            start = time.monotonic()
            out = await live.call(conn, payload, timeout=30)
            slowest = max(slowest, time.monotonic() - start)
            counts[out.code] += 1
            if out.code in ("internal", "call_timeout"):
                problems.append(f"{family}: {out.code} {out.message} for {payload[:64]!r}")
            elif out.ok and not accept(payload):
                problems.append(f"{family}: accepted {payload[:64]!r}")
            elif out.code == "connection_closed":
                async with lock:  # the server may drop us; it must still take us back
                    await conn.close()
                    conn = live.connect(kit, role, port)
                    await conn.connect()

    try:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    finally:
        await conn.close()
    return counts, problems, slowest


def _report(role: str, counts: Counter[str], slowest: float, rss: tuple[int, int]) -> None:
    n = sum(counts.values())
    print(
        f"\nfuzzed {role} with {n} messages (seed {fuzzing.fuzz_seed()}): "
        f"{dict(counts.most_common())}; slowest reply {slowest:.2f}s; "
        f"peak RSS {rss[0] // 1024} -> {rss[1] // 1024} MiB"
    )


def _check_round(fed: Federation, root: Path, clients: tuple[str, ...]) -> None:
    out = root / "agg-out" / "global-1.npy"
    live.wait_for(out.exists, 120, fed.logs)
    want, total = live.expected_average(clients, 0, live.zero_model(NUMEL))
    got = np.load(out, allow_pickle=False)
    assert np.abs(got - want).max() <= live.error_bound(len(clients), total)


def test_fuzzed_messages_at_the_aggregator(tmp_path: Path) -> None:
    """§2 "Bad input of any kind gets a clear error, never a crash, a hang or an
    unbounded allocation" at the real aggregator: N fuzzed messages from an enrolled
    client's identity all get typed errors (no ``internal``, no timeout), the process
    stays up with bounded peak memory, and the honest round afterwards is exact."""
    clients = (*live.HONEST, "mallory")
    root = live.provision_run(
        tmp_path, clients, min_clients=3, timeout_s=600.0, transport={"max_message_bytes": LIMIT}
    )
    model = live.zero_model(NUMEL)
    mallory = Kit.load(root / "client-mallory")
    blob = live.honest_update(root, "mallory", 0, model)
    genuine = ProtectedUpdate.decode(blob)
    valid = {
        "hello": messages.encode("hello"),
        "task": messages.encode("task", after=-1),
        "upload": messages.encode("upload", round=0, update=blob),
    }

    def accept(payload: bytes) -> bool:
        msg = _decoded(payload)
        if msg is None:
            return False
        if msg["t"] in ("hello", "task"):
            return True  # read-only requests
        try:
            return ProtectedUpdate.decode(msg["update"]) == genuine  # type: ignore[arg-type]
        except Exception:
            return False

    cases = fuzzing.generate(
        fuzzing.fuzz_count(), fuzzing.fuzz_seed(), valid, {"upload": "update"}, ["upload"]
    )
    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")
        pid = fed.procs["aggregator"].popen.pid
        before = fuzzing.peak_rss_kib(pid)
        counts, problems, slowest = live.run(_fuzz(mallory, "aggregator", port, cases, accept))
        after = fuzzing.peak_rss_kib(pid)
        assert fed.procs["aggregator"].popen.poll() is None, fed.logs()
        assert not problems, problems[:10]
        assert after - before < RSS_GROWTH_KIB, (before, after)
        assert "handler crashed" not in fed.procs["aggregator"].text()
        # Still serving: mallory's genuine upload counts once, then the honest round.
        final = live.run(live.call_once(mallory, "aggregator", port, valid["upload"]))
        assert final.code in ("ok", "duplicate_update"), final
        for c in live.HONEST:
            fed.start_client(c)
        _check_round(fed, root, clients)
    _report("aggregator", counts, slowest, (before, after))


def test_fuzzed_messages_at_the_keyholder(tmp_path: Path) -> None:
    """§2 "Bad input of any kind gets a clear error, never a crash, a hang or an
    unbounded allocation" at the real key holder: N fuzzed messages from the
    aggregator's identity (mutations of a real encrypted aggregate among them) all get
    typed errors, at most one aggregate is ever released — of the fuzzed round only; a
    byte-identical retry of it gets the same answer, with one ledger line — the process
    stays up with bounded peak memory, and a real round afterwards is exact."""
    root = live.provision_run(
        tmp_path,
        live.HONEST,
        min_clients=3,
        timeout_s=600.0,
        transport={"max_message_bytes": LIMIT},
    )
    model = live.zero_model(NUMEL)
    agg_kit = Kit.load(root / "aggregator")
    fuzz_round = 7
    aggregate = live.accumulate(
        root,
        [
            ProtectedUpdate.decode(live.honest_update(root, c, fuzz_round, model))
            for c in live.HONEST
        ],
        fuzz_round,
        NUMEL,
    )
    valid = {
        "status": messages.encode("status"),
        "decrypt": messages.encode("decrypt", aggregate=aggregate.encode()),
    }
    decrypted: list[tuple[int, str]] = []  # (round, SHA-256 of the aggregate bytes)

    def accept(payload: bytes) -> bool:
        msg = _decoded(payload)
        if msg is None:
            return False
        if msg["t"] == "status":
            return True
        try:
            agg = EncryptedAggregate.decode(msg["aggregate"])  # type: ignore[arg-type]
        except Exception:
            return False
        decrypted.append((agg.round, hashlib.sha256(msg["aggregate"]).hexdigest()))  # type: ignore[arg-type]
        return agg.round == fuzz_round and agg.manifest == aggregate.manifest

    cases = fuzzing.generate(
        fuzzing.fuzz_count(),
        fuzzing.fuzz_seed() + 1,
        valid,
        {"decrypt": "aggregate"},
        ["decrypt", "status"],
    )
    with federation(root) as fed:
        port = fed.start_keyholder()
        pid = fed.procs["keyholder"].popen.pid
        before = fuzzing.peak_rss_kib(pid)
        counts, problems, slowest = live.run(_fuzz(agg_kit, "keyholder", port, cases, accept))
        after = fuzzing.peak_rss_kib(pid)
        assert fed.procs["keyholder"].popen.poll() is None, fed.logs()
        assert not problems, problems[:10]
        # Each (run, round) released at most once: retries of those very bytes are
        # answered again (idempotent release), never another aggregate of the round.
        assert len(set(decrypted)) <= 1, decrypted
        ledger = root / "keyholder" / "state" / "ledger.jsonl"
        lines = ledger.read_text().splitlines() if ledger.exists() else []
        released = [x for x in lines if outcome_of(json.loads(x)) == "released"]
        assert len(released) == len(set(decrypted)), lines
        assert after - before < RSS_GROWTH_KIB, (before, after)
        assert "handler crashed" not in fed.procs["keyholder"].text()
        again = live.run(live.call_once(agg_kit, "keyholder", port, valid["decrypt"]))
        assert again.code in ("ok", "decryption_refused"), again
        fed.start_aggregator(f"vector:{NUMEL}")
        for c in live.HONEST:
            fed.start_client(c)
        _check_round(fed, root, live.HONEST)
    _report("key holder", counts, slowest, (before, after))
