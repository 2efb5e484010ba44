"""DESIGN §2 promise: "Every connection is mutually authenticated TLS 1.3 inside QUIC
against the run's own CA ... a peer with no certificate, another CA's certificate, an
expired or revoked one, or the wrong role is refused before any application data is
read."

Every test runs real endpoints with real certificates on 127.0.0.1, counts handler
invocations to prove a refused peer never reached application code, and then shows an
honest client is still served. A test taking ``transport`` runs twice: over QUIC
(aioquic, RpcClient) and over TLS 1.3/TCP (the ``ssl`` module, TlsRpcClient), against
the same RpcServer, which listens on both. Over TLS the refusal reason is asserted
exactly (``HandshakeFailed.refusal``); the raw-client tests have a TLS twin each.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from aioquic import tls as aioquic_tls
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secure_xfl.crypto import pem, pki
from secure_xfl.transport import ALPN, HandshakeFailed, RemoteError, RpcServer, TlsIdentity
from secure_xfl.transport.framing import decode_response

pytestmark = pytest.mark.timeout(30)

ALERT_CERTIFICATE_REQUIRED = QuicErrorCode.CRYPTO_ERROR + 116
ALERT_DECRYPT_ERROR = QuicErrorCode.CRYPTO_ERROR + 51
TLS_ALERT_DECRYPT_ERROR = 51


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


def _frame(body: bytes) -> bytes:
    """A TLS/TCP request frame (8-byte big-endian length, then the message)."""
    return len(body).to_bytes(8, "big") + body


async def _raw_tls_without_certificate(port: int, ca_pem: bytes) -> bytes:
    """Stock ``ssl`` client with no certificate that pushes a request at once (TLS 1.3
    lets it send right after its Finished). Returns the server's first frame; asserts
    the server then closed without answering the request."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.set_alpn_protocols([ALPN])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(_frame(b"let me in"))
        await writer.drain()
        async with asyncio.timeout(5):
            first: bytes = await reader.readexactly(
                int.from_bytes(await reader.readexactly(8), "big")
            )
            rest = await reader.read()  # the server closes: no reply to the request
        assert rest == b"", rest
        return first
    finally:
        writer.close()


class _Tls13ByHand:
    """A TLS 1.3 client over TCP built from aioquic's TLS engine and a hand-made record
    layer (AES-128-GCM), so it can sign CertificateVerify with a key that is not its
    certificate's: OpenSSL (and so :mod:`ssl`) refuses to even load such a pair."""

    def __init__(self, cert: Any, key: Any) -> None:
        self.tls = aioquic_tls.Context(
            is_client=True,
            alpn_protocols=[ALPN],
            cipher_suites=[aioquic_tls.CipherSuite.AES_128_GCM_SHA256],
            verify_mode=ssl.CERT_NONE,  # the attacker does not care who the server is
        )
        self.tls.certificate, self.tls.certificate_private_key = cert, key
        self.tls.update_traffic_key_cb = self._key
        self.out = {e: Buffer(capacity=1 << 16) for e in aioquic_tls.Epoch}
        self.enc: dict[aioquic_tls.Epoch, list[Any]] = {}
        self.dec: list[Any] | None = None  # the server's current write key

    def _key(self, direction: Any, epoch: Any, _suite: Any, secret: bytes) -> None:
        def expand(label: bytes, n: int) -> bytes:
            return aioquic_tls.hkdf_expand_label(hashes.SHA256(), secret, label, b"", n)

        state = [AESGCM(expand(b"key", 16)), expand(b"iv", 12), 0]
        if direction == aioquic_tls.Direction.ENCRYPT:
            self.enc[epoch] = state
        else:
            self.dec = state

    @staticmethod
    def _nonce(state: list[Any]) -> bytes:
        nonce: bytes = (int.from_bytes(state[1], "big") ^ state[2]).to_bytes(12, "big")
        state[2] += 1
        return nonce

    def _seal(self, epoch: Any, ctype: int, data: bytes) -> bytes:
        if epoch == aioquic_tls.Epoch.INITIAL:
            return bytes([ctype, 3, 1]) + len(data).to_bytes(2, "big") + data
        state = self.enc[epoch]
        header = bytes([23, 3, 3]) + (len(data) + 17).to_bytes(2, "big")
        sealed: bytes = state[0].encrypt(self._nonce(state), data + bytes([ctype]), header)
        return header + sealed

    def _open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        assert self.dec is not None
        inner: bytes = self.dec[0].decrypt(self._nonce(self.dec), body, header).rstrip(b"\0")
        return inner[-1], inner[:-1]

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        for epoch, buf in self.out.items():
            if buf.data:
                writer.write(self._seal(epoch, 22, buf.data))
                buf.seek(0)

    async def attempt(self, port: int, request: bytes) -> str:
        """Handshake, then send ``request`` at once; 'alert:<n>' (the TLS alert the
        server ended with), 'served:<reply body>' or 'closed'."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        frames = b""
        try:
            self.tls.handle_message(b"", self.out)
            self._flush(writer)
            sent = False
            async with asyncio.timeout(5):
                while True:
                    header = await reader.readexactly(5)
                    ctype, body = header[0], await reader.readexactly(int.from_bytes(header[3:]))
                    if ctype == 23:
                        ctype, body = self._open(header, body)
                    if ctype == 21:
                        return f"alert:{body[1]}"
                    if ctype == 22 and self.tls.state != aioquic_tls.State.CLIENT_POST_HANDSHAKE:
                        self.tls.handle_message(body, self.out)
                        self._flush(writer)
                    if ctype == 23:
                        frames += body
                    if not sent and self.tls.state == aioquic_tls.State.CLIENT_POST_HANDSHAKE:
                        writer.write(self._seal(aioquic_tls.Epoch.ONE_RTT, 23, _frame(request)))
                        sent = True
                    if len(frames) >= 8 and frames[:8] == bytes(8):  # verdict: accepted
                        rest = frames[8:]
                        if len(rest) >= 8 and len(rest) >= 8 + int.from_bytes(rest[:8], "big"):
                            return "served:" + decode_response(rest[8:]).decode()
        except asyncio.IncompleteReadError:
            return "closed"
        finally:
            writer.close()


async def _refused(
    tls: TlsIdentity, port: int, h: Any, server_role: str = "aggregator"
) -> HandshakeFailed:
    """Connect with the transport's client, expect HandshakeFailed, return it."""
    client = h.client(tls, port, server_role)
    with pytest.raises(HandshakeFailed) as info:
        await client.connect()
    await client.close()
    return info.value


def _assert_refusal(h: Any, exc: HandshakeFailed, tls: str, quic: tuple[str, ...] = ()) -> None:
    """Over TLS the refusal is exactly ``tls``; over QUIC the message names one of
    ``quic`` (the reason or its TLS alert code), when given."""
    if h.transport == "tls":
        assert exc.refusal == tls, (exc.refusal, str(exc))
    elif quic:
        assert any(q in str(exc) for q in quic), str(exc)


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


def test_tls_client_without_certificate_is_refused(fed: Any, h: Any) -> None:
    """§2 "a peer with no certificate" over TLS/TCP: OpenSSL lets the handshake finish
    (the certificate is optional at the TLS layer so the refusal can be named), the
    server's verdict frame refuses ``no_certificate``, and the request the client sent
    straight after its Finished never reaches the handler."""
    server_tls = fed.identity("aggregator", "agg")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        verdict = await _raw_tls_without_certificate(port, _pem(fed.ca))
        with pytest.raises(RemoteError) as info:
            decode_response(verdict)
        assert (info.value.code, info.value.reason) == ("peer_rejected", "no_certificate")
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port, transport="tls")
        assert len(handler.calls) == 1

    h.run(h.with_server(server_tls, ["client"], body))


def test_tls_certificate_without_its_private_key_is_refused(fed: Any, h: Any) -> None:
    """§2 mutual authentication over TLS/TCP: a stolen certificate presented with
    another key fails OpenSSL's CertificateVerify check (alert decrypt_error) and the
    request sent after the client's Finished never reaches the handler. The same
    hand-made client with the certificate's own key is served, so the refusal is the
    key's doing, not the client's; and ``ssl`` cannot even load such a pair."""
    server_tls = fed.identity("aggregator", "agg")
    victim = fed.identity("client", "victim")
    wrong_key = ec.generate_private_key(ec.SECP256R1())

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        stolen = await _Tls13ByHand(victim.certificate, wrong_key).attempt(port, b"let me in")
        assert stolen == f"alert:{TLS_ALERT_DECRYPT_ERROR}", stolen
        assert handler.calls == []
        own = await _Tls13ByHand(victim.certificate, victim.private_key).attempt(port, b"hi")
        assert own == "served:hi", own
        assert handler.calls == [pki.PeerIdentity(fed.federation, "client", "victim")]
        await h.honest_call(fed.identity("client", "honest"), port, transport="tls")

    h.run(h.with_server(server_tls, ["client"], body))


def test_ssl_cannot_load_a_certificate_with_another_key(fed: Any, tmp_path: Path) -> None:
    """Why the test above needs its own client: OpenSSL refuses a mismatched pair."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(_pem(fed.identity("client", "victim").certificate))
    other = ec.generate_private_key(ec.SECP256R1())
    key.write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))  # fmt: skip
    with pytest.raises(ssl.SSLError):
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)


def test_certificate_from_another_ca_is_refused(
    fed: Any, other_fed: Any, h: Any, transport: str
) -> None:
    """§2: "another CA's certificate ... is refused" (same federation name, impostor CA)."""
    server_tls = fed.identity("aggregator", "agg")
    impostor = other_fed.identity("client", "mallory", trust=fed.ca)

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(impostor, port, h)
        # TLS: OpenSSL's chain check sends "unknown CA", which the client names.
        _assert_refusal(h, exc, "untrusted", ("untrusted", "0x130"))
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(server_tls, ["client"], body))


def test_expired_certificate_is_refused(fed: Any, h: Any, transport: str) -> None:
    """§2: "an expired ... certificate is refused"."""
    now = h.utcnow()
    expired = fed.identity(
        "client",
        "old",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(expired, port, h)
        _assert_refusal(h, exc, "expired", ("expired", "0x12d"))
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_not_yet_valid_certificate_is_refused(fed: Any, h: Any, transport: str) -> None:
    """§2: a certificate outside its validity window (not yet valid) is refused."""
    now = h.utcnow()
    early = fed.identity(
        "client",
        "early",
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=9),
    )

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(early, port, h)
        _assert_refusal(h, exc, "not_yet_valid")
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_revoked_certificate_is_refused_after_crl_reload(
    fed: Any, h: Any, tmp_path: Path, transport: str
) -> None:
    """§2: "a revoked certificate is refused"; RpcServer.reload_crl applies a new CRL to
    new handshakes without a restart (on the TLS/TCP endpoint too)."""
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
        exc = await _refused(doomed, port, h)
        _assert_refusal(h, exc, "revoked", ("revoked", "0x12c"))
        assert len(handler.calls) == 1
        await h.honest_call(fed.identity("client", "honest"), port)
        assert len(handler.calls) == 2

    h.run(h.with_server(server_tls, ["client"], body))


def test_crl_signed_by_another_ca_fails_closed(
    fed: Any, other_fed: Any, h: Any, tmp_path: Path, transport: str
) -> None:
    """§2 revocation must be trustworthy: a CRL not signed by the run's CA is not trusted,
    and the server refuses peers rather than skip revocation checks."""
    crl_path = tmp_path / "crl.pem"
    pem.write_crl(crl_path, pki.build_crl(other_fed.ca, other_fed.ca_key, []))
    server_tls = fed.identity("aggregator", "agg", crl_path=crl_path)

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(fed.identity("client", "c1"), port, h)
        _assert_refusal(h, exc, "bad_crl")
        assert handler.calls == []

    h.run(h.with_server(server_tls, ["client"], body))


def test_wrong_role_is_refused(fed: Any, h: Any, transport: str) -> None:
    """§2: "the wrong role is refused": a client certificate calling an endpoint that
    admits only the aggregator (e.g. the key holder's decrypt endpoint)."""
    keyholder = fed.identity("keyholder", "kh")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(fed.identity("client", "c1"), port, h, server_role="keyholder")
        _assert_refusal(h, exc, "wrong_role", ("wrong_role", "0x131"))
        assert handler.calls == []
        await h.honest_call(fed.identity("aggregator", "agg"), port, server_role="keyholder")
        assert len(handler.calls) == 1

    h.run(h.with_server(keyholder, ["aggregator"], body))


def test_wrong_federation_is_refused(fed: Any, h: Any, transport: str) -> None:
    """§2: identities are per run: a certificate naming another federation is refused
    even when the CA signed it."""
    stranger = fed.identity("client", "c1", federation="other-fed")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(stranger, port, h)
        _assert_refusal(h, exc, "wrong_federation")
        assert handler.calls == []
        await h.honest_call(fed.identity("client", "honest"), port)

    h.run(h.with_server(fed.identity("aggregator", "agg"), ["client"], body))


def test_client_refuses_server_with_wrong_role(fed: Any, h: Any, transport: str) -> None:
    """§2 both directions: a client expecting the aggregator refuses a server whose
    certificate carries another role, and sends it nothing."""
    fake_aggregator = fed.identity("client", "pretender")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(fed.identity("client", "c1"), port, h, server_role="aggregator")
        assert "wrong_role" in str(exc)
        _assert_refusal(h, exc, "wrong_role")
        assert handler.calls == []

    h.run(h.with_server(fake_aggregator, ["client"], body))


def test_client_refuses_server_from_another_ca(
    fed: Any, other_fed: Any, h: Any, transport: str
) -> None:
    """§2 both directions: a client refuses a server certificate from another CA."""
    impostor_server = other_fed.identity("aggregator", "agg", trust=other_fed.ca)

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        exc = await _refused(fed.identity("client", "c1"), port, h)
        _assert_refusal(h, exc, "untrusted")
        assert handler.calls == []

    h.run(h.with_server(impostor_server, ["client"], body))


def test_verified_identity_reaches_handler(fed: Any, h: Any, transport: str) -> None:
    """§2: "Each certificate carries its role and identity": the handler sees the
    verified SPIFFE identity and the client sees the server's."""
    client_tls = fed.identity("client", "hospital-a")

    async def body(server: RpcServer, port: int, handler: Any) -> None:
        async with h.client(client_tls, port) as client:
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
