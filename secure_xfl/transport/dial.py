"""Reach a server over the configured transport: QUIC, TLS/TCP, or one then the other.

``protocol = "auto"`` tries ``prefer`` (TLS/TCP by default: it won every condition
measured) for ``fallback_after_s``; a handshake that does not complete in time
(nothing listening, a middlebox dropping the traffic, UDP or TCP blocked) falls back to
the other transport with one log line saying so. A *refused* handshake (a certificate
refused, too many connections) does not fall back: the other transport would refuse
for the same reason. Either way the server is checked exactly as that transport checks
it.
"""

from __future__ import annotations

import logging
from typing import Literal

from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.errors import HandshakeFailed, TooManyConnections
from secure_xfl.transport.rpc import RpcClient
from secure_xfl.transport.tcp import TlsRpcClient

__all__ = ["Client", "client_for", "dial"]

log = logging.getLogger("secure_xfl.transport.dial")

Client = RpcClient | TlsRpcClient
Protocol = Literal["quic", "tls"]


def client_for(
    protocol: str, tls: TlsIdentity, role: str, host: str, port: int, cfg: TransportConfig
) -> Client:
    """An unconnected client over TLS/TCP when ``protocol`` is ``tls``, else QUIC."""
    if protocol == "tls":
        return TlsRpcClient(tls=tls, server_role=role, host=host, port=port, config=cfg)
    return RpcClient(tls=tls, server_role=role, host=host, port=port, config=cfg)


async def _open(client: Client, timeout: float | None) -> Client:
    try:
        await client.connect(timeout=timeout)
    except BaseException:
        await client.close()
        raise
    return client


async def dial(
    *,
    tls: TlsIdentity,
    server_role: str,
    host: str,
    port: int,
    config: TransportConfig,
    timeout: float | None = None,
    prefer: Protocol | None = None,
) -> Client:
    """A connected client for ``config.protocol`` (``prefer``: skip auto's QUIC attempt
    and use this transport, e.g. the one that worked last time)."""
    protocol = prefer or config.protocol
    if protocol in ("quic", "tls"):
        return await _open(client_for(protocol, tls, server_role, host, port, config), timeout)
    first: Protocol = config.prefer
    second: Protocol = "quic" if first == "tls" else "tls"
    wait = config.fallback_after_s if timeout is None else min(config.fallback_after_s, timeout)
    try:
        return await _open(client_for(first, tls, server_role, host, port, config), wait)
    except TooManyConnections:
        raise
    except HandshakeFailed as exc:
        if exc.refusal is not None:
            raise  # refused, not unreachable: the other transport would refuse alike
        why: BaseException = exc
    except OSError as exc:
        why = exc
    log.warning("no %s handshake with %s at %s:%d within %.1f s (%s): falling back to %s",
                _NAMES[first], server_role, host, port, wait, why, _NAMES[second])  # fmt: skip
    rest = None if timeout is None else max(0.1, timeout - wait)
    return await _open(client_for(second, tls, server_role, host, port, config), rest)


_NAMES = {"quic": "QUIC", "tls": "TLS/TCP"}
