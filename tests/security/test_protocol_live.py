"""Replayed, tampered, truncated, oversized and stalled messages at the real servers.

DESIGN §2 promises: "Replayed, reordered, duplicated, truncated or tampered messages
are rejected with a typed error; the server keeps serving and loses nothing it had
accepted." and "Bad input of any kind gets a clear error, never a crash, a hang or an
unbounded allocation (size limits on every message and field)."

tests/integration/test_bad_input.py covers single-round bad uploads; here a replay
crosses a real round boundary, tampering is done both with and without re-computing
the digest, and the transport-level attacks (stalled, reset and oversized streams)
hit both the aggregator and the key-holder processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.crypto.envelope import ProtectedUpdate, SignedStatement, ciphertext_digest
from secure_xfl.kit import Kit
from secure_xfl.protocol import messages
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.transport.errors import StreamReset, TransportError
from secure_xfl.transport.rpc import RpcClient
from secure_xfl.transport.streams import ERR_TIMEOUT
from tests.federation import federation
from tests.security import live

pytestmark = pytest.mark.timeout(240)

NUMEL = 1000
CLIENTS = (*live.HONEST, "mallory")
LIMIT = 2 * 1024 * 1024


def _upload(rnd: int, blob: bytes) -> bytes:
    return messages.encode("upload", round=rnd, update=blob)


def _flip_chunk(blob: bytes, *, redigest: bool) -> bytes:
    """Flip one ciphertext byte in transit; optionally also fix up the signed digest."""
    upd = ProtectedUpdate.decode(blob)
    chunk = bytearray(upd.chunks[0])
    chunk[len(chunk) // 2] ^= 0x01
    chunks = (bytes(chunk), *upd.chunks[1:])
    signed = upd.signed
    if redigest:
        st = dataclasses.replace(signed.statement, ciphertext_digest=ciphertext_digest(chunks))
        signed = SignedStatement(st, signed.signature)
    return ProtectedUpdate(signed, chunks).encode()


async def _wait_round(client: RpcClient, rnd: int) -> RoundPlan:
    """Poll 'task' as a client would until round ``rnd`` is collecting; its plan."""
    for _ in range(600):
        out = await live.call(client, messages.encode("task", after=rnd - 1))
        assert out.ok, out
        msg = messages.decode(out.body)
        if msg["t"] == "round" and msg["round"] == rnd:
            return RoundPlan.from_wire(msg["plan"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"round {rnd} never opened")


def test_replay_across_rounds_and_tampering_are_refused_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """§2 "Replayed, duplicated … or tampered messages are rejected with a typed error;
    the server keeps serving and loses nothing it had accepted": in round 1 of a real
    two-round run, mallory's round-0 upload replayed (relabelled or not), alpha's round-0
    upload replayed by mallory and by alpha's own identity, ciphertext bytes flipped in
    transit (with and without a fixed-up digest) and a duplicate are all refused with
    their typed codes; both released models are exactly the honest FedAvg of every
    accepted update."""
    root = live.provision_run(tmp_path, CLIENTS, rounds=2, min_clients=3, timeout_s=120.0)
    model = live.zero_model(NUMEL)
    mallory, alpha = Kit.load(root / "client-mallory"), Kit.load(root / "client-alpha")
    m0 = live.honest_update(root, "mallory", 0, model)
    a0 = live.honest_update(root, "alpha", 0, model)

    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")

        async def attack() -> dict[str, str]:
            seen: dict[str, str] = {}
            async with live.connect(mallory, "aggregator", port) as m:
                assert (await live.call(m, _upload(0, m0))).ok
                seen["duplicate"] = (await live.call(m, _upload(0, m0))).code
                for c in live.HONEST:
                    fed.start_client(c)
                plan1 = await _wait_round(m, 1)  # round 1 trains the round-0 result
                m1 = live.honest_update(root, "mallory", 1, model, plan=plan1)
                seen["replay_round0_as_round1"] = (await live.call(m, _upload(1, m0))).code
                seen["replay_round0_as_round0"] = (await live.call(m, _upload(0, m0))).code
                seen["replay_of_alpha_by_mallory"] = (await live.call(m, _upload(1, a0))).code
                seen["flipped_ciphertext_byte"] = (
                    await live.call(m, _upload(1, _flip_chunk(m1, redigest=False)))
                ).code
                seen["flipped_byte_digest_fixed"] = (
                    await live.call(m, _upload(1, _flip_chunk(m1, redigest=True)))
                ).code
                async with live.connect(alpha, "aggregator", port) as a:
                    seen["replay_of_alpha_by_alpha"] = (await live.call(a, _upload(1, a0))).code
                seen["valid_round1"] = (await live.call(m, _upload(1, m1))).code
                await live.hear_done(m, after=1)
                return seen

        seen = live.run(asyncio.wait_for(attack(), 180))
        assert fed.wait("aggregator", timeout=120) == 0, fed.logs()

    assert seen == {
        "replay_round0_as_round1": "aggregation",
        "replay_round0_as_round0": "round_closed",
        "replay_of_alpha_by_mallory": "aggregation",
        "flipped_ciphertext_byte": "bad_envelope",
        "flipped_byte_digest_fixed": "bad_signature",
        "replay_of_alpha_by_alpha": "aggregation",
        "valid_round1": "ok",
        "duplicate": "duplicate_update",
    }, seen
    everyone = (*live.HONEST, "mallory")
    params = np.zeros(NUMEL)
    for r in (0, 1):
        avg, total = live.expected_average(everyone, r, model)
        params = params + avg
        got = np.load(root / "agg-out" / f"global-{r + 1}.npy", allow_pickle=False)
        assert np.abs(got - params).max() <= (r + 1) * live.error_bound(4, total)
    print(f"\nreplay/tamper outcomes: {seen}")


async def _stall(client: RpcClient, partial: bytes, wait: float) -> str:
    """Open a request stream, send ``partial`` without FIN, and report what the server did."""
    proto = client._protocol
    assert proto is not None
    sid = proto._quic.get_next_available_stream_id()
    proto._quic.send_stream_data(sid, partial)
    proto.transmit()
    state = proto.open_inbound(sid, 1 << 20)
    state.watched = False  # our side waits; only the server's sweep may end it
    assert state.done is not None
    try:
        await asyncio.wait_for(asyncio.shield(state.done), wait)
    except StreamReset as exc:
        return f"reset:{exc.error_code:#x}"
    except TimeoutError:
        return "still open"
    return "answered"


async def _reset_midway(client: RpcClient, partial: bytes) -> None:
    """Send half a request and then reset the stream (a truncated transfer)."""
    proto = client._protocol
    assert proto is not None
    sid = proto._quic.get_next_available_stream_id()
    proto._quic.send_stream_data(sid, partial)
    proto.transmit()
    proto._quic.reset_stream(sid, 0x1)
    proto.transmit()
    await asyncio.sleep(0.2)


def test_stalled_truncated_and_oversized_streams_at_both_servers(tmp_path: Path) -> None:
    """§2 "never … a hang or an unbounded allocation" and "truncated … messages are
    rejected": at the real aggregator and key-holder processes, a request stream that
    stalls mid-message is reset by the server after stream_timeout_s (error 0x102), a
    stream reset half-way is dropped, a truncated message gets a typed error and an
    oversized one is cut off at the configured limit; the same connection then still
    gets its honest request served."""
    root = live.provision_run(
        tmp_path, CLIENTS, min_clients=3, transport={"max_message_bytes": LIMIT}
    )
    model = live.zero_model(NUMEL)
    mallory, agg_kit = Kit.load(root / "client-mallory"), Kit.load(root / "aggregator")
    upload = _upload(0, live.honest_update(root, "mallory", 0, model))
    decrypt = messages.encode(
        "decrypt",
        aggregate=live.accumulate(
            root,
            [ProtectedUpdate.decode(live.honest_update(root, c, 0, model)) for c in live.HONEST],
            0,
            NUMEL,
        ).encode(),
    )
    stall_after = agg_kit.config.transport.stream_timeout_s

    async def probe(kit: Kit, role: str, port: int, valid: bytes, hello: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        # QUIC explicitly, whatever the kit's transport: the probes drive QUIC streams
        # (the TLS/TCP stalls are tests/unit/test_tcp.py's); servers listen on both.
        async with live.connect(kit, role, port, protocol="quic") as c:
            assert isinstance(c, RpcClient)
            out["stalled"] = await _stall(c, valid[: len(valid) // 2], stall_after * 4)
            await _reset_midway(c, valid[: len(valid) // 2])
            out["truncated"] = (await live.call(c, valid[: len(valid) // 2])).code
            big = messages.encode(messages.decode(valid)["t"], pad=bytes(LIMIT + 1))
            out["oversized"] = (await live.call(c, big)).code
            out["not_a_message"] = (await live.call(c, b"\x00" * (LIMIT + 1))).code
            out["served_after"] = (await live.call(c, hello)).code
            out["valid_after"] = (await live.call(c, valid)).code
        return out

    with federation(root) as fed:
        kh_port = fed.start_keyholder()
        agg_port = fed.start_aggregator(f"vector:{NUMEL}")
        try:
            at_agg = live.run(
                probe(mallory, "aggregator", agg_port, upload, messages.encode("hello"))
            )
            at_kh = live.run(
                probe(agg_kit, "keyholder", kh_port, decrypt, messages.encode("status"))
            )
        except TransportError as exc:  # pragma: no cover - diagnostic
            raise AssertionError(f"{exc}\n{fed.logs()}") from exc
        logs = fed.logs()
        for name in ("aggregator", "keyholder"):
            assert fed.procs[name].popen.poll() is None, logs
    for seen in (at_agg, at_kh):
        assert seen["stalled"] == f"reset:{ERR_TIMEOUT:#x}", seen
        assert seen["truncated"] == "protocol", seen
        assert seen["oversized"] in ("message_too_large", "stream_reset"), seen
        assert seen["not_a_message"] in ("protocol", "stream_reset"), seen
        assert seen["served_after"] == "ok", seen
        assert seen["valid_after"] == "ok", seen
    assert "stalled for" in logs
    print(f"\naggregator: {at_agg}\nkey holder: {at_kh}")
