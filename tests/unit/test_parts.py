"""Parallel QUIC's reassembly (transport/parts.py): bounded, verified, one message per peer.

The reassembler is driven directly (it is the handler a server hands verified requests
to); one live test sends a request in two parts from two worker processes over two
real mTLS QUIC connections.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from secure_xfl.crypto import pem, pki
from secure_xfl.transport import RpcServer, TlsIdentity, TransportConfig, parts
from secure_xfl.transport.errors import MalformedRequest, MessageTooLarge, ServerBusy
from secure_xfl.transport.limits import BufferBudget
from secure_xfl.transport.parts import PART_ACK, Reassembler, parallel_call, split

PEER = pki.PeerIdentity("f", "client", "a")
OTHER = pki.PeerIdentity("f", "client", "b")


def _upload(n: int) -> bytes:
    return bytes(msgpack.packb({"t": "upload", "v": 1, "update": bytes(range(256)) * (n // 256)}))


class Inner:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, bytes]] = []

    async def __call__(self, peer: Any, payload: bytes) -> bytes:
        self.seen.append((peer, payload))
        return b"done"


def _reassembler(
    inner: Inner, *, budget: int = 1 << 24, cap: int = 1 << 22, timeout: float = 60.0
) -> tuple[Reassembler, BufferBudget]:
    b = BufferBudget(budget)
    r = Reassembler(inner, limit_for=lambda t: cap if t == "upload" else None,
                    max_total=lambda: cap, budget=b, timeout_s=timeout)  # fmt: skip
    return r, b


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_parts_in_any_order_reassemble_to_the_exact_request() -> None:
    inner = Inner()
    r, budget = _reassembler(inner)
    payload = _upload(100_000)
    parts = split(payload, 5)
    replies = [run(r(PEER, p)) for p in (parts[3], parts[0], parts[4], parts[1])]
    assert replies == [PART_ACK] * 4 and inner.seen == []
    assert budget.used == len(payload)  # claimed up front, for the whole message
    assert run(r(PEER, parts[2])) == b"done"
    assert inner.seen == [(PEER, payload)]
    assert budget.used == 0


def test_a_request_that_is_not_a_part_passes_through() -> None:
    inner = Inner()
    r, _ = _reassembler(inner)
    assert run(r(PEER, b"not msgpack at all")) == b"done"
    assert inner.seen == [(PEER, b"not msgpack at all")]


def _tamper(part: bytes, **fields: Any) -> bytes:
    msg = msgpack.unpackb(part, raw=False)
    msg.update(fields)
    return bytes(msgpack.packb(msg))


def test_a_tampered_part_fails_the_digest_and_nothing_reaches_the_handler() -> None:
    inner = Inner()
    r, budget = _reassembler(inner)
    parts = split(_upload(10_000), 2)
    bad = msgpack.unpackb(parts[1], raw=False)
    data = bytearray(bad["data"])
    data[0] ^= 1
    run(r(PEER, parts[0]))
    with pytest.raises(MalformedRequest, match="SHA-256"):
        run(r(PEER, _tamper(parts[1], data=bytes(data))))
    assert inner.seen == [] and budget.used == 0


@pytest.mark.parametrize(
    "change, error",
    [
        ({"len": 1 << 23}, MessageTooLarge),  # declared over the endpoint's largest request
        ({"n": 65}, MalformedRequest),  # more parts than MAX_PARTS
        ({"i": 2}, MalformedRequest),  # index outside 0..n-1
        ({"id": b"short"}, MalformedRequest),
        ({"sha": b"x" * 31}, MalformedRequest),
        ({"data": "text"}, MalformedRequest),
        ({"len": True}, MalformedRequest),
    ],
)
def test_malformed_parts_are_refused_typed(change: dict[str, Any], error: type) -> None:
    inner = Inner()
    r, budget = _reassembler(inner)
    part = split(_upload(10_000), 2)[0]
    with pytest.raises(error):
        run(r(PEER, _tamper(part, **change)))
    assert inner.seen == [] and budget.used == 0


def test_a_duplicate_or_misfit_part_drops_the_message() -> None:
    inner = Inner()
    r, budget = _reassembler(inner)
    parts = split(_upload(10_000), 3)
    run(r(PEER, parts[0]))
    with pytest.raises(MalformedRequest, match="twice"):
        run(r(PEER, parts[0]))
    assert budget.used == 0
    run(r(PEER, parts[0]))
    short = msgpack.unpackb(parts[1], raw=False)
    with pytest.raises(MalformedRequest, match="wrong size"):
        run(r(PEER, _tamper(parts[1], data=short["data"][:-1])))
    assert inner.seen == [] and budget.used == 0


def test_the_buffer_budget_bounds_reassembly_and_a_new_message_replaces_the_old() -> None:
    inner = Inner()
    payload = _upload(100_000)
    r, budget = _reassembler(inner, budget=1 << 20, cap=1 << 20)
    first = split(payload, 2)
    run(r(PEER, first[0]))
    with pytest.raises(ServerBusy):  # another peer's message does not fit beside it
        run(r(OTHER, split(_upload(1_000_000), 2)[0]))
    second = split(payload, 2)  # a fresh id from the same peer replaces its old message
    run(r(PEER, second[0]))
    assert budget.used == len(payload)
    assert run(r(PEER, second[1])) == b"done" and budget.used == 0


def test_an_incomplete_message_expires_and_releases_its_claim() -> None:
    inner = Inner()
    r, budget = _reassembler(inner, timeout=0.0)
    parts = split(_upload(10_000), 2)
    run(r(PEER, parts[0]))
    assert budget.used > 0
    run(r(OTHER, split(_upload(1_000), 2)[0]))  # any later part sweeps expired ones
    assert budget.used == len(_upload(1_000))


def test_the_reassembled_request_obeys_its_own_types_limit() -> None:
    inner = Inner()
    b = BufferBudget(1 << 24)
    r = Reassembler(inner, limit_for=lambda t: None, max_total=lambda: 1 << 22, budget=b,
                    timeout_s=60)  # fmt: skip
    parts = split(_upload(10_000), 2)
    run(r(PEER, parts[0]))
    with pytest.raises(MessageTooLarge, match="not accepted"):
        run(r(PEER, parts[1]))
    assert inner.seen == [] and b.used == 0


@pytest.mark.timeout(120)
def test_two_workers_send_requests_and_are_kept_for_the_next(tmp_path: Path) -> None:
    ca, ca_key = pki.create_ca("f")
    pem.write_certificate(tmp_path / "ca.pem", ca)

    def ident(role: str, name: str) -> TlsIdentity:
        cert, key = pki.issue_certificate(ca, ca_key, pki.PeerIdentity("f", role, name))
        pem.write_certificate(tmp_path / f"{name}.pem", cert)
        pem.write_private_key(tmp_path / f"{name}.key", key)
        return TlsIdentity(cert=tmp_path / f"{name}.pem", key=tmp_path / f"{name}.key",
                           ca_cert=tmp_path / "ca.pem", federation="f")  # fmt: skip

    peers: list[Any] = []
    sizes: list[int] = []

    async def handler(peer: Any, payload: bytes) -> bytes:
        peers.append(peer)
        sizes.append(len(payload))
        return hashlib.sha256(payload).digest()

    workers_seen: list[set[int]] = []

    async def main() -> list[bytes]:
        cfg = TransportConfig(handshake_timeout_s=20.0)
        server = RpcServer(tls=ident("aggregator", "agg"), allowed_roles=["client"],
                           handler=handler, config=cfg,
                           limits=lambda t: {"upload": 4 << 20}[t],
                           parallel_types=("upload",))  # fmt: skip
        port = await server.start("127.0.0.1", 0)
        out = []
        try:
            for payload in payloads:
                out.append(await parallel_call(tls=ident("client", "c"),
                                               server_role="aggregator", host="127.0.0.1",
                                               port=port, config=cfg, payload=payload,
                                               workers=2))  # fmt: skip
                workers_seen.append(set(parts._POOLS[2]._processes))  # type: ignore[arg-type]
        finally:
            await server.close()
        return out

    payloads = [_upload(2_000_000), _upload(1_500_000)]
    try:
        assert asyncio.run(main()) == [hashlib.sha256(p).digest() for p in payloads]
    finally:
        parts.shutdown_pools()
    assert sizes == [len(p) for p in payloads]  # each reached the application once, whole
    assert peers == [pki.PeerIdentity("f", "client", "c")] * 2
    # The second call ran on the same two worker processes: no new interpreters.
    assert len(workers_seen[0]) == 2 and workers_seen[0] == workers_seen[1]
    assert not parts._POOLS
