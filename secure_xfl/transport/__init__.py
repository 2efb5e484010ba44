"""Mutually authenticated QUIC transport (aioquic + TLS 1.3 client certificates).

Public API: :class:`RpcServer`, :class:`RpcClient`, :class:`TransportConfig`,
:class:`TlsIdentity` and the error types in :mod:`secure_xfl.transport.errors`.
"""

from secure_xfl.transport.config import ALPN, TlsIdentity, TransportConfig
from secure_xfl.transport.errors import (
    CallTimeout,
    ConnectionClosed,
    HandshakeFailed,
    MalformedRequest,
    MessageTooLarge,
    PeerRejected,
    RemoteError,
    ServerBusy,
    StreamReset,
    StreamTimeout,
    TooManyConnections,
    UnsupportedAioquic,
)
from secure_xfl.transport.rpc import Handler, RpcClient, RpcServer

__all__ = [
    "ALPN",
    "CallTimeout",
    "ConnectionClosed",
    "Handler",
    "HandshakeFailed",
    "MalformedRequest",
    "MessageTooLarge",
    "PeerRejected",
    "RemoteError",
    "RpcClient",
    "RpcServer",
    "ServerBusy",
    "StreamReset",
    "StreamTimeout",
    "TlsIdentity",
    "TooManyConnections",
    "TransportConfig",
    "UnsupportedAioquic",
]
