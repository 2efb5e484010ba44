"""Mutual TLS against the real role processes (test_mtls.py covers RpcServer in-process).

DESIGN §2 promise: "Every connection is mutually authenticated TLS 1.3 inside QUIC
against the run's own CA. Each certificate carries its role and identity …; a peer
with no certificate, another CA's certificate, an expired or revoked one, or the
wrong role is refused before any application data is read."

Here the servers are real ``secure-xfl keyholder`` / ``aggregator`` processes and the
clients real ``secure-xfl client`` processes, all provisioned by the real CLI. After
the refusals the honest clients finish a round through the same processes and the
released aggregate is exact: the refusals cost nothing that had been accepted.

Each test runs over both transports (``transport``: the kits' ``[transport] protocol``
is "quic" or "tls", so the real processes dial and the probes connect over it; the
servers listen on both anyway). Nothing here is QUIC-specific: the peer checks, the
client's refusal of a bad server and revocation on a live connection are promised on
every transport, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_xfl.crypto import pem, pki
from secure_xfl.kit import Kit
from secure_xfl.protocol import messages
from secure_xfl.services.client import EXIT_PERMANENT
from secure_xfl.transport import HandshakeFailed, RemoteError, RpcClient, RpcServer, TlsIdentity
from secure_xfl.transport.framing import decode_response
from secure_xfl.transport.tcp import TlsRpcClient
from tests.federation import CLI, Federation, federation
from tests.security import live
from tests.security.test_mtls import (
    ALERT_CERTIFICATE_REQUIRED,
    _raw_client_attempt,
    _raw_tls_without_certificate,
)

pytestmark = pytest.mark.timeout(240)

NUMEL = 1000
CLIENTS = (*live.HONEST, "mallory")


def _client(transport: str, tls: TlsIdentity, role: str, port: int, kit: Kit) -> Any:
    """RpcClient (QUIC) or TlsRpcClient (TLS/TCP) with ``tls``, the kit's settings."""
    cls = TlsRpcClient if transport == "tls" else RpcClient
    return cls(tls=tls, server_role=role, host="127.0.0.1", port=port, config=kit.config.transport)


async def _handshake(tls: TlsIdentity, role: str, port: int, kit: Kit) -> str:
    """Connect over the kit's protocol and say hello; 'served' or 'refused(<refusal>):
    <why>'."""
    transport = kit.config.transport.protocol
    client = _client(transport, tls, role, port, kit)
    try:
        await client.connect()
    except HandshakeFailed as exc:
        return f"refused({exc.refusal}): {exc}"
    try:
        out = await live.call(
            client, messages.encode("hello" if role == "aggregator" else "status")
        )
        return "served" if out.ok else f"error {out.code}"
    finally:
        await client.close()


async def _no_certificate(transport: str, port: int, ca_pem: bytes) -> str:
    """A stock client without a certificate: how the server refused it."""
    if transport == "quic":
        code = await _raw_client_attempt(port, ca_pem)
        return "refused: certificate_required" if code == ALERT_CERTIFICATE_REQUIRED else str(code)
    try:
        decode_response(await _raw_tls_without_certificate(port, ca_pem))
    except RemoteError as exc:
        return f"refused({exc.reason}): {exc}"
    return "served"


def _identity_from_ca(root: Path, role: str, name: str, **issue: Any) -> TlsIdentity:
    """A certificate the federation's own CA issued (what a provisioner mistake or a
    stolen old kit would give an attacker)."""
    ca = pem.load_certificate(root / "ca" / "ca.pem")
    ca_key = pem.load_private_key(root / "ca" / "ca-key.pem")
    fed_name = Kit.load(root / "aggregator").config.federation.name
    cert, key = pki.issue_certificate(
        ca,
        ca_key,  # type: ignore[arg-type]
        pki.PeerIdentity(fed_name, role, name),
        **issue,
    )
    return TlsIdentity(cert=cert, key=key, ca_cert=ca, federation=fed_name)


def _foreign_identity(root: Path, role: str, name: str) -> TlsIdentity:
    """Same federation name and role, but issued by an impostor CA."""
    fed_name = Kit.load(root / "aggregator").config.federation.name
    other_ca, other_key = pki.create_ca(fed_name)
    cert, key = pki.issue_certificate(other_ca, other_key, pki.PeerIdentity(fed_name, role, name))
    return TlsIdentity(
        cert=cert,
        key=key,
        ca_cert=pem.load_certificate(root / "ca" / "ca.pem"),
        federation=fed_name,
    )


def _run_honest_round(fed: Federation, root: Path) -> None:
    """Start the honest client processes; the released round-0 model must be exact."""
    for c in live.HONEST:
        fed.start_client(c)
    out = root / "agg-out" / "global-1.npy"
    live.wait_for(out.exists, 90, fed.logs)
    model = live.zero_model(NUMEL)
    want, total = live.expected_average(live.HONEST, 0, model)
    got = np.load(out, allow_pickle=False)
    assert np.abs(got - want).max() <= live.error_bound(3, total)


def test_real_servers_refuse_bad_certificates_and_keep_serving(
    tmp_path: Path, transport: str
) -> None:
    """§2 mTLS promise at the real key-holder and aggregator processes: a client
    certificate calling the key holder, an aggregator or key-holder certificate calling
    the aggregator (wrong role), no certificate, an impostor CA, an expired and a
    not-yet-valid certificate of the run's own CA, and a certificate revoked while the
    aggregator runs are all refused at the handshake; honest clients then finish the
    round and the aggregate is exact."""
    # The revoked client stays counted as enrolled by the running aggregator (see
    # test_revocation_applies_to_live_connections), so the round closes at its deadline.
    root = live.provision_run(
        tmp_path, CLIENTS, min_clients=3, timeout_s=20.0, transport={"protocol": transport}
    )
    kits = {c: Kit.load(root / f"client-{c}") for c in CLIENTS}
    agg_kit, kh_kit = Kit.load(root / "aggregator"), Kit.load(root / "keyholder")
    now = dt.datetime.now(dt.UTC)
    with federation(root) as fed:
        kh_port = fed.start_keyholder()
        agg_port = fed.start_aggregator(f"vector:{NUMEL}")

        async def probe() -> dict[str, str]:
            m = kits["mallory"]
            out = {
                "client_calls_keyholder": await _handshake(m.tls, "keyholder", kh_port, m),
                "aggregator_cert_at_keyholder": await _handshake(
                    agg_kit.tls, "keyholder", kh_port, m
                ),
                "keyholder_cert_at_aggregator": await _handshake(
                    kh_kit.tls, "aggregator", agg_port, m
                ),
                "aggregator_cert_at_aggregator": await _handshake(
                    agg_kit.tls, "aggregator", agg_port, m
                ),
                "impostor_ca_at_aggregator": await _handshake(
                    _foreign_identity(root, "client", "alpha"), "aggregator", agg_port, m
                ),
                "impostor_ca_at_keyholder": await _handshake(
                    _foreign_identity(root, "aggregator", "main"), "keyholder", kh_port, m
                ),
                "expired_at_aggregator": await _handshake(
                    _identity_from_ca(
                        root,
                        "client",
                        "mallory",
                        not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1),
                    ),
                    "aggregator",
                    agg_port,
                    m,
                ),
                "not_yet_valid_at_keyholder": await _handshake(
                    _identity_from_ca(
                        root,
                        "aggregator",
                        "main",
                        not_before=now + dt.timedelta(days=1),
                        not_after=now + dt.timedelta(days=30),
                    ),
                    "keyholder",
                    kh_port,
                    m,
                ),
                "mallory_before_revocation": await _handshake(m.tls, "aggregator", agg_port, m),
            }
            ca_pem = (root / "ca" / "ca.pem").read_bytes()
            out["no_certificate_at_aggregator"] = await _no_certificate(transport, agg_port, ca_pem)
            out["no_certificate_at_keyholder"] = await _no_certificate(transport, kh_port, ca_pem)
            return out

        seen = live.run(probe())
        assert seen["mallory_before_revocation"] == "served"
        assert seen["aggregator_cert_at_keyholder"] == "served"
        refused = {k: v for k, v in seen.items() if k not in ("mallory_before_revocation",)}
        refused.pop("aggregator_cert_at_keyholder")
        assert all(v.startswith("refused") for v in refused.values()), seen
        for k in (
            "client_calls_keyholder",
            "keyholder_cert_at_aggregator",
            "aggregator_cert_at_aggregator",
        ):
            assert "wrong_role" in seen[k] or "0x131" in seen[k], seen[k]
        if transport == "tls":  # TLS/TCP names every refusal exactly
            assert {k: v.split(")")[0] for k, v in refused.items()} == {
                "client_calls_keyholder": "refused(wrong_role",
                "keyholder_cert_at_aggregator": "refused(wrong_role",
                "aggregator_cert_at_aggregator": "refused(wrong_role",
                "impostor_ca_at_aggregator": "refused(untrusted",
                "impostor_ca_at_keyholder": "refused(untrusted",
                "expired_at_aggregator": "refused(expired",
                "not_yet_valid_at_keyholder": "refused(not_yet_valid",
                "no_certificate_at_aggregator": "refused(no_certificate",
                "no_certificate_at_keyholder": "refused(no_certificate",
            }, seen

        # Revoke mallory while the aggregator runs: it reloads the CRL (watch_crl) and
        # refuses her next handshake without a restart.
        subprocess.run(
            [*CLI, "provision", "--out", str(root), "--revoke", "mallory"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 15
        verdict = ""
        while time.monotonic() < deadline:
            verdict = live.run(
                _handshake(kits["mallory"].tls, "aggregator", agg_port, kits["alpha"])
            )
            if verdict.startswith("refused"):
                break
            time.sleep(0.5)
        assert verdict.startswith("refused") and ("revoked" in verdict or "0x12c" in verdict)
        assert "application data" not in fed.procs["aggregator"].text()
        _run_honest_round(fed, root)
    print(f"\nreal-process handshakes: {seen} | revoked: {verdict}")


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, peer: pki.PeerIdentity, data: bytes) -> bytes:
        self.calls += 1
        return b""


async def _impostor_server(tls: TlsIdentity, root: Path, client: str) -> tuple[int, str]:
    """Serve as the 'aggregator' with ``tls`` and point a real client process at it."""
    handler = _Counting()
    kit = Kit.load(root / f"client-{client}")
    server = RpcServer(
        tls=tls, allowed_roles=("client",), handler=handler, config=kit.config.transport
    )
    port = await server.start("127.0.0.1", 0)
    log = root / f"impostor-{client}.log"
    proc = subprocess.Popen(
        [
            *CLI,
            "client",
            "--kit",
            str(root / f"client-{client}"),
            "--aggregator",
            f"127.0.0.1:{port}",
            "--trainer",
            "random",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # A refused server certificate is a permanent failure: the client exits at
        # once with EXIT_PERMANENT instead of retrying.
        rc = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        await server.close()
    assert rc == EXIT_PERMANENT, log.read_text()
    return handler.calls, log.read_text()


def test_real_client_refuses_impostor_aggregators(tmp_path: Path, transport: str) -> None:
    """§2 "mutually authenticated" in the client's direction: a real client process
    refuses a server holding a valid *client* certificate of the run posing as the
    aggregator (wrong role), and a server whose certificate comes from another CA; it
    never sends a request to either (the impostor's handler is never called)."""
    root = live.provision_run(tmp_path, CLIENTS, min_clients=3, transport={"protocol": transport})
    mallory = Kit.load(root / "client-mallory")
    calls, log = live.run(_impostor_server(mallory.tls, root, "alpha"))
    assert calls == 0
    assert "server certificate refused: wrong_role" in log, log
    calls, log = live.run(
        _impostor_server(_foreign_identity(root, "aggregator", "main"), root, "beta")
    )
    assert calls == 0
    if transport == "tls":
        assert "server certificate refused: untrusted" in log, log
    else:
        assert "handshake failed" in log, log
    assert "local issuer" in log or "untrusted" in log, log


def test_revocation_applies_to_live_connections(tmp_path: Path, transport: str) -> None:
    """§2 "a … revoked [certificate] is refused": a client revoked while it holds an
    open connection to the running aggregator must not get an update accepted
    afterwards, and the honest clients' round must still complete."""
    root = live.provision_run(
        tmp_path, CLIENTS, min_clients=3, timeout_s=60.0, transport={"protocol": transport}
    )
    mallory = Kit.load(root / "client-mallory")
    model = live.zero_model(NUMEL)
    blob = live.honest_update(root, "mallory", 0, model)
    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")

        async def revoke_then_upload() -> live.Outcome:
            conn = _client(transport, mallory.tls, "aggregator", port, mallory)
            async with conn:
                assert (await live.call(conn, messages.encode("hello"))).ok
                subprocess.run(
                    [*CLI, "provision", "--out", str(root), "--revoke", "mallory"],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
                # Wait until the aggregator has reloaded the CRL (new handshakes refused).
                for _ in range(60):
                    verdict = await _handshake(mallory.tls, "aggregator", port, mallory)
                    if verdict.startswith("refused"):
                        break
                    await asyncio.sleep(0.25)
                return await live.call(
                    conn, messages.encode("upload", round=0, update=blob), timeout=30
                )

        outcome = live.run(revoke_then_upload())
        assert not outcome.ok, "a revoked client's update was accepted on its live connection"
        _run_honest_round(fed, root)
