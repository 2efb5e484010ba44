"""One RpcServer and a client factory on 127.0.0.1 with throw-away certificates."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from secure_xfl.crypto import pki
from secure_xfl.transport import RpcClient, RpcServer, TlsIdentity, TransportConfig
from secure_xfl.transport.rpc import Handler


class Harness:
    """A federation CA for one test module, and :meth:`serve` to run a body against it."""

    def __init__(self, federation: str) -> None:
        self.federation = federation
        self.ca, self.ca_key = pki.create_ca(federation)

    def identity(self, role: str, name: str) -> TlsIdentity:
        ident = pki.PeerIdentity(self.federation, role, name)
        cert, key = pki.issue_certificate(self.ca, self.ca_key, ident)
        return TlsIdentity(cert=cert, key=key, ca_cert=self.ca, federation=self.federation)

    def serve(
        self,
        handler: Handler,
        body: Callable[[int, Callable[[], RpcClient]], Awaitable[None]],
        *,
        config: TransportConfig,
        max_message_bytes: int | None = None,
    ) -> None:
        """Start an aggregator-role server admitting clients, run ``body(port, client)``."""

        async def main() -> None:
            server = RpcServer(
                tls=self.identity("aggregator", "agg"),
                allowed_roles=["client"],
                handler=handler,
                config=config,
                max_message_bytes=max_message_bytes,
            )
            port = await server.start("127.0.0.1", 0)

            def client() -> RpcClient:
                return RpcClient(
                    tls=self.identity("client", "c1"),
                    server_role="aggregator",
                    host="127.0.0.1",
                    port=port,
                    config=config,
                )

            try:
                await body(port, client)
            finally:
                await server.close()

        asyncio.run(main())


async def call_once_a_slot_frees(
    make: Callable[[], Any], payload: bytes, outcome: Callable[[Any], Awaitable[str]]
) -> str:
    """Connect with ``make()`` until the server has freed a connection slot (it hears a
    close a moment after it happens), send ``payload`` and return ``outcome`` of the call."""
    from secure_xfl.transport import TooManyConnections

    for _ in range(50):
        try:
            async with make() as c:
                return await outcome(c.call(payload, timeout=5))
        except TooManyConnections:
            await asyncio.sleep(0.1)
    raise AssertionError("the server never freed a connection slot")
