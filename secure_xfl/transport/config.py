"""Transport configuration: QUIC tuning knobs and the party's TLS identity."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secure_xfl.crypto import pem, pki
from secure_xfl.errors import ConfigError

__all__ = ["ALPN", "MAX_DATAGRAM_SIZE", "TlsIdentity", "TransportConfig"]

#: Application protocol negotiated on every secure-xfl connection.
ALPN = "secure-xfl/1"

_GIB = 1 << 30

#: Largest ``max_datagram_size`` accepted. aioquic 1.7 writes the length of every
#: STREAM/CRYPTO frame (and of long-header packets) as a fixed 2-byte varint
#: (``push_uint16(length | 0x4000)``), which holds at most 16383. In a bigger
#: datagram a frame longer than that is mis-encoded: the peer reads a shorter frame
#: and parses the rest of the data as frames. Zero bytes parse as PADDING, so the
#: packet is acknowledged while part of the stream never arrives (the upload
#: stalls); other bytes abort the connection ("Failed to parse frame"). 16384
#: leaves room for the packet header, AEAD tag and frame header, so no frame can
#: exceed 16383 bytes.
MAX_DATAGRAM_SIZE = 16384


@dataclass(frozen=True)
class TransportConfig:
    """QUIC and framing limits shared by :class:`RpcServer` and :class:`RpcClient`."""

    max_datagram_size: int = 1452
    """Largest UDP payload sent. 1452 fits a 1500-byte Ethernet MTU with IPv6+UDP
    headers; aioquic's default is the 1200-byte QUIC minimum. Larger values (e.g.
    9000 on jumbo-frame links, up to :data:`MAX_DATAGRAM_SIZE` on loopback) cut
    per-packet overhead considerably."""
    handshake_timeout_s: float = 10.0
    """A connection whose handshake (including certificate checks and the peer's
    confirmation) does not finish within this is abandoned."""
    connect_deadline_s: float = 600.0
    """How long a party keeps retrying a peer it cannot reach (no response, handshake
    timeout, connection dropped, ``busy``) before giving up, with exponential backoff
    and jitter between attempts; counted from the first attempt of each call. This is
    the window a client rides out an aggregator restart in (and an aggregator a key
    holder's): 10 minutes covers a process restart or a VM being rescheduled. A
    permanent failure (a refused certificate, the wrong role, not enrolled, revoked)
    is never retried."""
    idle_timeout_s: float = 60.0
    """QUIC idle timeout: a connection with no traffic for this long is closed."""
    peer_silence_s: float = 10.0
    """While a call waits for its reply the client PINGs the server every second; when
    nothing at all comes back for this long, the connection is closed and the call
    retried on a new one. This is how a client notices a server that died and was
    restarted on the same port before it could hear ICMP unreachable (the new process
    silently drops packets of connections it never had). A live server acknowledges
    a PING within milliseconds, even while its handler computes."""
    stream_timeout_s: float = 60.0
    """A stream that makes no progress (no bytes received or acknowledged) for this
    long is reset, so a stalled peer cannot pin a handler or buffers forever."""
    max_message_bytes: int = _GIB
    """Upper bound on one request or response body; the receiver stops reading and
    resets the stream the moment it is exceeded. RpcServer may override it, and its
    per-type ``limits`` (e.g. the aggregator's upload size from the layout) are capped
    by it."""
    max_concurrent_streams: int = 8
    """Most requests in flight per connection, counting requests still arriving and
    requests being handled (the client waits for a slot; the server refuses extras
    with ``busy``). aioquic itself caps peer-opened bidirectional streams at 128."""
    max_connections_per_peer: int = 4
    """Most connections one verified identity (SPIFFE id) may hold open on a server.
    A further connection is closed right after its certificate is verified (QUIC
    application error 0x103, "too many connections"); the client raises
    ``TooManyConnections``. With ``max_concurrent_streams`` this bounds one peer to
    ``max_connections_per_peer x max_concurrent_streams`` requests in flight."""
    max_buffered_bytes: int = 256 << 20
    """Server-wide budget for buffered request bytes. A request claims its type's limit
    once its type is known (before that, the bytes it sent; without per-type limits,
    the bytes it sent so far); a request whose claim does not fit is refused with
    ``busy`` instead of being buffered. Claims are released when the request is
    answered, refused, reset or times out. The budget is never below the claim of the
    request being admitted, so one request of the largest kind is always admissible
    on an idle server: the bound is ``max(max_buffered_bytes, largest limit)``."""
    min_request_rate_bytes_s: float = 32768.0
    """Slowest average rate at which a request may arrive, after a grace period of
    ``stream_timeout_s`` from its first byte: a request with fewer than
    ``rate x (elapsed - stream_timeout_s)`` bytes is reset (``stream_timeout``), so a
    peer trickling bytes cannot pin a slot or a buffer claim for long (a request of
    ``n`` bytes may take at most ``stream_timeout_s + n / rate``). 0 disables it."""
    alpn: str = ALPN
    """ALPN protocol id; both sides must agree or the handshake fails."""
    flow_control_window_bytes: int = 16 << 20
    """Initial QUIC receive window per stream and per connection. Bigger windows keep
    the pipe full on high bandwidth-delay paths; memory per stream is still bounded
    by ``max_message_bytes`` because the receiver counts and resets."""
    send_buffer_bytes: int = 4 << 20
    """Most unacknowledged bytes a sender keeps queued in aioquic per stream before
    waiting for acknowledgements: bounds sender memory for huge payloads."""
    congestion_control: str = "bbr"
    """QUIC congestion controller: ``bbr`` (``transport/congestion.py``), a delivery-rate
    x min-RTT window that random loss does not shrink, or aioquic's ``reno`` or
    ``cubic``, which halve their window on every loss: at 50 ms RTT and 1 % loss they
    move 0.3–0.4 MB/s against ``bbr``'s 23 (BENCHMARKS.md, "WAN"). Like TCP BBR it
    yields less to loss-based flows on a shared bottleneck; pick ``cubic`` to share
    a congested link politely."""
    socket_buffer_bytes: int = 4 << 20
    """UDP socket receive/send buffer requested (the kernel caps it at
    net.core.rmem_max / wmem_max). Larger buffers absorb bursts instead of dropping
    datagrams, each drop costing a congestion-window cut and a loss recovery."""
    protocol: Literal["quic", "tls", "auto"] = "auto"
    """How a client reaches a server: ``quic`` (mTLS QUIC over UDP), ``tls`` (TLS 1.3
    over TCP) or ``auto`` (``prefer`` first; the other when no handshake completes
    within ``fallback_after_s``, logged). Both carry the same RPC framing, limits and
    peer checks; servers always listen on both, on the same port number."""
    prefer: Literal["tls", "quic"] = "tls"
    """``auto``: the transport tried first. TLS/TCP by measurement (BENCHMARKS.md, "WAN"):
    it delivered 2–5× QUIC's goodput on loopback and at 50 ms RTT, and 1.09× at 50 ms
    with 1 % loss (QUIC with ``bbr``), so QUIC is the fallback where TCP does not get
    through."""
    fallback_after_s: float = 3.0
    """``auto``: seconds the first transport's handshake may take before the other is
    tried."""
    upload_workers: int = 1
    """Parallel QUIC: a request of at least ``parallel_min_bytes`` (an upload) is cut into
    this many parts, each sent by its own worker process over its own connection, and
    reassembled and verified by the server (``transport/parts.py``); aioquic's packet path
    is GIL-bound, so this is how an upload uses several cores. 1 = off. At most
    ``max_connections_per_peer``."""
    parallel_min_bytes: int = 8 << 20
    """Smallest request sent in parts when ``upload_workers`` > 1."""

    def __post_init__(self) -> None:
        if not 1200 <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise ConfigError(
                f"max_datagram_size must be within [1200, {MAX_DATAGRAM_SIZE}]: aioquic "
                "encodes frame lengths in 2 bytes, so bigger datagrams corrupt streams"
            )
        for name in (
            "handshake_timeout_s",
            "connect_deadline_s",
            "idle_timeout_s",
            "stream_timeout_s",
            "peer_silence_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_message_bytes < 1:
            raise ConfigError("max_message_bytes must be positive")
        if not 1 <= self.max_concurrent_streams <= 128:
            raise ConfigError("max_concurrent_streams must be within [1, 128]")
        if not 1 <= self.max_connections_per_peer <= 1024:
            raise ConfigError("max_connections_per_peer must be within [1, 1024]")
        if self.max_buffered_bytes < 1 << 20:
            raise ConfigError("max_buffered_bytes must be at least 1 MiB")
        if not 0 <= self.min_request_rate_bytes_s < float("inf"):
            raise ConfigError("min_request_rate_bytes_s must be finite and not negative")
        if not self.alpn or len(self.alpn) > 255:
            raise ConfigError("alpn must be 1..255 characters")
        if self.flow_control_window_bytes < 64 << 10:
            raise ConfigError("flow_control_window_bytes must be at least 64 KiB")
        if self.send_buffer_bytes < 64 << 10:
            raise ConfigError("send_buffer_bytes must be at least 64 KiB")
        if self.socket_buffer_bytes < 0:
            raise ConfigError("socket_buffer_bytes must not be negative")
        if self.congestion_control not in ("reno", "cubic", "bbr"):
            raise ConfigError("congestion_control must be 'reno', 'cubic' or 'bbr'")
        if self.protocol not in ("quic", "tls", "auto"):
            raise ConfigError("protocol must be 'quic', 'tls' or 'auto'")
        if self.prefer not in ("quic", "tls"):
            raise ConfigError("prefer must be 'quic' or 'tls'")
        if not self.fallback_after_s > 0:
            raise ConfigError("fallback_after_s must be positive")
        if not 1 <= self.upload_workers <= min(16, self.max_connections_per_peer):
            raise ConfigError(
                "upload_workers must be within [1, min(16, max_connections_per_peer)]"
            )
        if self.parallel_min_bytes < 1 << 16:
            raise ConfigError("parallel_min_bytes must be at least 64 KiB")


@dataclass(frozen=True)
class TlsIdentity:
    """This party's certificate and key, the federation CA, and the CRL to apply.

    Paths are read lazily (once) and bounded in size; objects are used as given.
    """

    cert: x509.Certificate | str | os.PathLike[str]
    """This party's leaf certificate (object or PEM path)."""
    key: pki.PrivateKey | str | os.PathLike[str]
    """The certificate's private key (object or PEM path, ideally mode 0600)."""
    ca_cert: x509.Certificate | str | os.PathLike[str]
    """The federation CA certificate every peer must chain to."""
    federation: str
    """Federation name; peers from another federation are refused."""
    crl_path: str | os.PathLike[str] | None = None
    """Optional PEM CRL signed by the CA; re-read by ``reload_crl()``."""
    crl: x509.CertificateRevocationList | None = field(default=None, compare=False)
    """Optional CRL object used when ``crl_path`` is not set (tests, in-memory use)."""

    @cached_property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate, loaded."""
        if isinstance(self.cert, x509.Certificate):
            return self.cert
        return pem.load_certificate(self.cert)

    @cached_property
    def private_key(self) -> pki.PrivateKey:
        """The private key, loaded and checked to match the certificate."""
        if isinstance(self.key, str | os.PathLike):
            loaded = pem.load_private_key(self.key)
        else:
            loaded = self.key
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if loaded.public_key().public_bytes(enc, fmt) != self.certificate.public_key().public_bytes(
            enc, fmt
        ):
            raise ConfigError("private key does not match the certificate")
        return loaded

    @cached_property
    def ca_certificate(self) -> x509.Certificate:
        """The federation CA certificate, loaded."""
        if isinstance(self.ca_cert, x509.Certificate):
            return self.ca_cert
        return pem.load_certificate(self.ca_cert)

    @cached_property
    def identity(self) -> pki.PeerIdentity:
        """Our own identity, from our certificate."""
        return pki.identity_of(self.certificate)

    def load_crl(self) -> x509.CertificateRevocationList | None:
        """Read the CRL now (from ``crl_path`` if set, else the ``crl`` object)."""
        if self.crl_path is not None:
            return pem.load_crl(self.crl_path)
        return self.crl
