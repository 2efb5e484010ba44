"""Shared fixtures for the transport security tests: a federation PKI and a server.

A test that takes the ``transport`` fixture runs once per transport ("quic": RpcClient
over QUIC/UDP, "tls": TlsRpcClient over TLS 1.3/TCP); its ``h`` then dials with that
transport. RpcServer listens on both, on the same port number, so the server side is
the same object either way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto import pki
from secure_xfl.transport import RpcClient, RpcServer, TlsIdentity, TransportConfig
from secure_xfl.transport.tcp import TlsRpcClient

FEDERATION = "fed-test"
FAST = TransportConfig(handshake_timeout_s=3.0, idle_timeout_s=10.0, stream_timeout_s=3.0)
TRANSPORTS = ("quic", "tls")


@dataclass
class Pki:
    """A federation CA plus helpers to mint identities under it."""

    tmp: Path
    federation: str = FEDERATION
    ca: x509.Certificate = field(init=False)
    ca_key: ec.EllipticCurvePrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.ca, self.ca_key = pki.create_ca(self.federation)

    def identity(
        self,
        role: str,
        name: str,
        *,
        federation: str | None = None,
        trust: x509.Certificate | None = None,
        crl_path: Path | None = None,
        **issue: Any,
    ) -> TlsIdentity:
        """A TlsIdentity for role/name issued by this CA (trusting ``trust`` or this CA)."""
        ident = pki.PeerIdentity(federation or self.federation, role, name)
        cert, key = pki.issue_certificate(self.ca, self.ca_key, ident, **issue)
        return TlsIdentity(
            cert=cert,
            key=key,
            ca_cert=trust if trust is not None else self.ca,
            federation=self.federation,
            crl_path=crl_path,
        )


@pytest.fixture
def fed(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def other_fed(tmp_path: Path) -> Pki:
    """A second, unrelated CA for the same federation name (an impostor CA)."""
    return Pki(tmp_path)


class CountingHandler:
    """Echo handler that records every invocation (proves refusals never reach it)."""

    def __init__(self) -> None:
        self.calls: list[pki.PeerIdentity] = []

    async def __call__(self, peer: pki.PeerIdentity, payload: bytes) -> bytes:
        self.calls.append(peer)
        return payload


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def with_server(
    server_tls: TlsIdentity,
    allowed_roles: list[str],
    body: Callable[[RpcServer, int, CountingHandler], Awaitable[None]],
    config: TransportConfig = FAST,
) -> CountingHandler:
    """Run ``body(server, port, handler)`` against a live server on 127.0.0.1."""
    handler = CountingHandler()
    server = RpcServer(tls=server_tls, allowed_roles=allowed_roles, handler=handler, config=config)
    port = await server.start("127.0.0.1", 0)
    try:
        await body(server, port, handler)
    finally:
        await server.close()
    return handler


def client_for(
    transport: str,
    tls: TlsIdentity,
    port: int,
    server_role: str = "aggregator",
    config: TransportConfig = FAST,
) -> RpcClient | TlsRpcClient:
    """The client of ``transport`` (same constructor arguments on both)."""
    cls = TlsRpcClient if transport == "tls" else RpcClient
    assert transport in TRANSPORTS, transport
    return cls(tls=tls, server_role=server_role, host="127.0.0.1", port=port, config=config)


async def honest_call(
    client_tls: TlsIdentity, port: int, server_role: str = "aggregator", transport: str = "quic"
) -> None:
    """An honest client succeeds: the server kept serving after a refusal."""
    async with client_for(transport, client_tls, port, server_role) as client:
        assert await client.call(b"ping", timeout=5) == b"ping"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


class Harness:
    """Helpers handed to tests through the ``h`` fixture (conftest is not importable),
    bound to one transport: the test's ``transport`` parameter, else QUIC."""

    FAST = FAST
    CountingHandler = CountingHandler
    utcnow = staticmethod(utcnow)
    with_server = staticmethod(with_server)
    run = staticmethod(run)

    def __init__(self, transport: str = "quic") -> None:
        self.transport = transport

    def client(
        self, tls: TlsIdentity, port: int, server_role: str = "aggregator"
    ) -> RpcClient | TlsRpcClient:
        """A client of this harness's transport."""
        return client_for(self.transport, tls, port, server_role)

    async def honest_call(
        self,
        client_tls: TlsIdentity,
        port: int,
        server_role: str = "aggregator",
        transport: str | None = None,
    ) -> None:
        """An honest client of this transport (or ``transport``) is served."""
        await honest_call(client_tls, port, server_role, transport or self.transport)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Run the test once over QUIC/UDP and once over TLS/TCP."""
    return str(request.param)


@pytest.fixture
def h(request: pytest.FixtureRequest) -> Harness:
    """The harness, dialing with the test's ``transport`` if it takes one (else QUIC)."""
    if "transport" in request.fixturenames:
        return Harness(str(request.getfixturevalue("transport")))
    return Harness()
