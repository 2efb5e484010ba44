"""DESIGN §2 promise: "Every connection is mutually authenticated TLS 1.3 inside QUIC
against the run's own CA ... a peer with no certificate, another CA's certificate, an
expired or revoked one, or the wrong role is refused before any application data is
read."

Every test runs real aioquic endpoints with real certificates on 127.0.0.1, counts
handler invocations to prove a refused peer never reached application code, and
then shows an honest client is still served.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto import pem, pki
from secure_xfl.transport import ALPN, HandshakeFailed, RpcClient, RpcServer, TlsIdentity

pytestmark = pytest.mark.timeout(30)

ALERT_CERTIFICATE_REQUIRED = QuicErrorCode.CRYPTO_ERROR + 116
ALERT_DECRYPT_ERROR = QuicErrorCode.CRYPTO_ERROR + 51


class _Recorder(QuicConnectionProtocol):
    """Plain aioquic client protocol that remembers how the connection ended."""

    closed_with: events.ConnectionTerminated | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.closed_with = event
        super().quic_event_received(event)


async def _raw_client_attempt(
    port: int, ca_pem: bytes, *, cert: Any = None, key: Any = None
) -> int:
    """Stock aioquic client (no secure-xfl hook) that tries to send a request anyway.

    Returns the QUIC error code the connection was closed with.
    """
    config = QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN], cadata=ca_pem, verify_mode=ssl.CERT_REQUIRED
    )
    config.certificate, config.private_key = cert, key
    recorders: list[_Recorder] = []

    def factory(*args: Any, **kwargs: Any) -> _Recorder:
        recorders.append(_Recorder(*args, **kwargs))
        return recorders[-1]

    try:
        async with connect("127.0.0.1", port, configuration=config, create_protocol=factory) as p:
            # From the client's side TLS 1.3 is done once it sends Finished, so it can
            # push application data at once: the server must never deliver it.
            _, writer = await p.create_stream()
            writer.write(b"let me in")
            writer.write_eof()
            await asyncio.wait_for(p.wait_closed(), 5)
    except ConnectionError:  # the refusal may also arrive before the handshake is done
        pass
    closed = recorders[0].closed_with
    assert closed is not None
    return closed.error_code


async def _refused(tls: TlsIdentity, port: int, h: Any, server_role: str = "aggregator") -> str:
    """Connect with RpcClient, expect HandshakeFailed, return its message."""
    client = RpcClient(tls=tls, server_role=server_role, host="127.0.0.1", port=port, config=h.FAST)
    with pytest.raises(HandshakeFailed) as info:
        await client.connect()
    await client.close()
    return str(info.value)


def _pem(cert: Any) -> bytes:
    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_client_without_certificate_is_refused(fed: Any, h: Any) -> None:
    """§2: "a peer with no certificate ... is refused before any application data is read"."""
    server_tls = fed.identity("aggregator", "agg")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        code = await _raw_client_attempt(port, _pem(fed.ca))
        assert code == ALERT_CERTIFICATE_REQUIRED
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)
        assert len(handler.calls) == 1

    h.run(h.with_server(server_tls, ["client"], body))


def test_certificate_without_its_private_key_is_refused(fed: Any, h: Any) -> None:
    """§2 mutual authentication: presenting someone's certificate without its key fails
    the CertificateVerify signature over the handshake transcript."""
    server_tls = fed.identity("aggregator", "agg")
    stolen = fed.identity("client", "victim").certificate
    wrong_key = ec.generate_private_key(ec.SECP256R1())

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        code = await _raw_client_attempt(port, _pem(fed.ca), cert=stolen, key=wrong_key)
        assert code == ALERT_DECRYPT_ERROR
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(server_tls, ["client"], body))


def test_certificate_from_another_ca_is_refused(fed: Any, other_fed: Any, h: Any) -> None:
    """§2: "another CA's certificate ... is refused" (same federation name, impostor CA)."""
    server_tls = fed.identity("aggregator", "agg")
    impostor = other_fed.identity("client", "mallory", trust=fed.ca)

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        message = await _refused(impostor, port, h)
        assert "untrusted" in message or "0x130" in message
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(server_tls, ["client"], body))


def test_expired_certificate_is_refused(fed: Any, h: Any) -> None:
    """§2: "an expired ... certificate is refused"."""
    now = h.utcnow()
    expired = fed.identity(
        "client",
        "old",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        message = await _refused(expired, port, h)
        assert "expired" in message or "0x12d" in message
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_not_yet_valid_certificate_is_refused(fed: Any, h: Any) -> None:
    """§2: a certificate outside its validity window (not yet valid) is refused."""
    now = h.utcnow()
    early = fed.identity(
        "client",
        "early",
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=9),
    )

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        await _refused(early, port, h)
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_revoked_certificate_is_refused_after_crl_reload(fed: Any, h: Any, tmp_path: Path) -> None:
    """§2: "a revoked certificate is refused"; RpcServer.reload_crl applies a new CRL to
    new handshakes without a restart."""
    crl_path = tmp_path / "crl.pem"
    pem.write_crl(crl_path, pki.build_crl(fed.ca, fed.ca_key, []))
    server_tls = fed.identity("aggregator", "agg", crl_path=crl_path)
    doomed = fed.identity("client", "doomed")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        await h.honest_call(doomed, port)  # not yet revoked
        assert len(handler.calls) == 1
        serial = doomed.certificate.serial_number
        pem.write_crl(crl_path, pki.build_crl(fed.ca, fed.ca_key, [serial]))
        server.reload_crl()
        message = await _refused(doomed, port, h)
        assert "revoked" in message or "0x12c" in message
        assert len(handler.calls) == 1
        await h.honest_call(fed.identity("client", "honest"), port)
        assert len(handler.calls) == 2

    h.run(h.with_server(server_tls, ["client"], body))


def test_crl_signed_by_another_ca_fails_closed(
    fed: Any, other_fed: Any, h: Any, tmp_path: Path
) -> None:
    """§2 revocation must be trustworthy: a CRL not signed by the run's CA is not trusted,
    and the server refuses peers rather than skip revocation checks."""
    crl_path = tmp_path / "crl.pem"
    pem.write_crl(crl_path, pki.build_crl(other_fed.ca, other_fed.ca_key, []))
    server_tls = fed.identity("aggregator", "agg", crl_path=crl_path)

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        await _refused(fed.identity("client", "c1"), port, h)
        assert handler.calls == []

    h.run(h.with_server(server_tls, ["client"], body))


def test_wrong_role_is_refused(fed: Any, h: Any) -> None:
    """§2: "the wrong role is refused": a client certificate calling an endpoint that
    admits only the aggregator (e.g. the key holder's decrypt endpoint)."""
    keyholder = fed.identity("keyholder", "kh")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        message = await _refused(fed.identity("client", "c1"), port, h, server_role="keyholder")
        assert "wrong_role" in message or "0x131" in message
        assert handler.calls == []
        await h.honest_call(fed.identity("aggregator", "agg"), port, server_role="keyholder")
        assert len(handler.calls) == 1

    h.run(h.with_server(keyholder, ["aggregator"], body))


def test_wrong_federation_is_refused(fed: Any, h: Any) -> None:
    """§2: identities are per run: a certificate naming another federation is refused
    even when the CA signed it."""
    stranger = fed.identity("client", "c1", federation="other-fed")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        await _refused(stranger, port, h)
        assert handler.calls == []

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_client_refuses_server_with_wrong_role(fed: Any, h: Any) -> None:
    """§2 both directions: a client expecting the aggregator refuses a server whose
    certificate carries another role, and sends it nothing."""
    fake_aggregator = fed.identity("client", "pretender")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        message = await _refused(fed.identity("client", "c1"), port, h, server_role="aggregator")
        assert "wrong_role" in message
        assert handler.calls == []

    h.run(h.with_server(fake_aggregator, ["client"], body))


def test_client_refuses_server_from_another_ca(fed: Any, other_fed: Any, h: Any) -> None:
    """§2 both directions: a client refuses a server certificate from another CA."""
    impostor_server = other_fed.identity("aggregator", "agg", trust=other_fed.ca)

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        await _refused(fed.identity("client", "c1"), port, h)
        assert handler.calls == []

    h.run(h.with_server(impostor_server, ["client"], body))


def test_verified_identity_reaches_handler(fed: Any, h: Any) -> None:
    """§2: "Each certificate carries its role and identity": the handler sees the
    verified SPIFFE identity and the client sees the server's."""
    client_tls = fed.identity("client", "hospital-a")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        async with RpcClient(
            tls=client_tls, server_role="aggregator", host="127.0.0.1", port=port, config=h.FAST
        ) as client:
            assert client.server_identity == pki.PeerIdentity(fed.federation, "aggregator", "agg")
            await client.call(b"x")
        assert handler.calls == [pki.PeerIdentity(fed.federation, "client", "hospital-a")]

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_unvetted_aioquic_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """§2 "this must be built, with care": the hook depends on aioquic internals, so an
    aioquic outside the vetted range is refused with a clear error, not run unsafely."""
    import aioquic

    from secure_xfl.transport import UnsupportedAioquic, mtls

    assert mtls.check_aioquic() == aioquic.__version__
    monkeypatch.setattr(aioquic, "__version__", "1.8.0")
    with pytest.raises(UnsupportedAioquic):
        mtls.check_aioquic()
