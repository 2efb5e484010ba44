"""Mutual TLS 1.3 for aioquic: the server requests, and both sides verify, certificates.

aioquic has no public API for client certificates on the server side. Its TLS
engine (``aioquic.tls.Context``) can already *send* a CertificateRequest and check
the client's CertificateVerify signature over the transcript, but only behind a
private test flag, it accepts an empty client Certificate, and it never validates
the client's chain. This module closes those gaps with the smallest hook we could
find, applied per connection (no global patching):

* :func:`install_mutual_tls` wraps ``QuicConnection._initialize`` **on one
  instance**; after aioquic builds that connection's ``tls.Context`` the wrapper
  re-classes that one object to :class:`_MutualTlsContext`, a subclass of
  ``tls.Context`` (it adds no state aioquic's ``__init__`` would have to set up).
* :class:`_MutualTlsContext` overrides five handshake steps, each calling the
  original first:

  - ``_server_handle_certificate``: an empty client Certificate → alert 116
    ``certificate_required`` (aioquic would continue unauthenticated).
  - ``_server_handle_certificate_verify`` / ``_client_handle_certificate_verify``:
    after aioquic has checked the CertificateVerify signature over the
    transcript with the leaf's key, run :func:`~secure_xfl.crypto.pki.verify_peer`
    (CA, validity, CRL, role, federation) and abort with a TLS alert on refusal.
  - ``_server_handle_finished`` / ``_client_handle_finished``: refuse to finish
    any handshake without a verified peer (defence in depth, e.g. against a
    future PSK path that skips certificates).

Because the server installs its 1-RTT read key only inside
``_server_handle_finished``, no application byte from a refused client can ever
be decrypted, let alone reach a handler. Session tickets (PSK resumption, 0-RTT)
are never enabled: resumed sessions would skip the certificate exchange.

aioquic internals relied upon (checked by :func:`check_aioquic`):
``tls.Context`` attributes ``_request_client_certificate``, ``_peer_certificate``,
``_peer_certificate_chain``, ``get_session_ticket_cb``, ``new_session_ticket_cb``
and the five methods above; ``QuicConnection._initialize`` and ``.tls``.
Accepted range: ``>=1.7,<1.8`` (full test suite run on 1.7.2). aioquic 1.2.0 was
also tried: every mTLS security test passed (its handlers take an extra
``output_buf`` argument, which the overrides forward untouched), but its stream
reset path asserts on a double reset, so it stays outside the range.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import aioquic
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secure_xfl.crypto import pki
from secure_xfl.transport import congestion as _congestion  # noqa: F401  registers "bbr"
from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.errors import UnsupportedAioquic

__all__ = [
    "AIOQUIC_RANGE",
    "PeerPolicy",
    "build_quic_configuration",
    "check_aioquic",
    "install_mutual_tls",
    "peer_identity",
]

log = logging.getLogger("secure_xfl.transport.mtls")

#: aioquic versions (inclusive lower, exclusive upper) the hook is accepted on.
AIOQUIC_RANGE: tuple[tuple[int, int], tuple[int, int]] = ((1, 7), (1, 8))

_CONTEXT_METHODS = (
    "_server_handle_certificate",
    "_server_handle_certificate_verify",
    "_server_handle_finished",
    "_client_handle_certificate_verify",
    "_client_handle_finished",
    "_check_certificate_verify_signature",
)


def check_aioquic() -> str:
    """Refuse to run on an aioquic we have not vetted; returns its version string."""
    # The imported module's version, not the distribution metadata: what we hook is
    # whatever code is actually imported.
    installed = str(getattr(aioquic, "__version__", "0"))
    try:
        major_minor = tuple(int(p) for p in installed.split(".")[:2])
    except ValueError as exc:
        raise UnsupportedAioquic(f"cannot parse aioquic version {installed!r}") from exc
    low, high = AIOQUIC_RANGE
    if not low <= major_minor < high:
        raise UnsupportedAioquic(
            f"aioquic {installed} is outside the range secure-xfl's mutual-TLS hook was "
            f"vetted on (>={low[0]}.{low[1]},<{high[0]}.{high[1]}); pin aioquic accordingly"
        )
    missing = [m for m in _CONTEXT_METHODS if not callable(getattr(tls.Context, m, None))]
    if not callable(getattr(QuicConnection, "_initialize", None)):
        missing.append("QuicConnection._initialize")
    if missing:
        raise UnsupportedAioquic(f"aioquic {installed} lacks internals we hook: {missing}")
    return installed


def _alert(description: tls.AlertDescription) -> type[tls.Alert]:
    return type(f"Alert_{description.name}", (tls.Alert,), {"description": description})


# RFC 8446 §6.2 alert for each refusal reason; the peer learns only the category.
_ALERT_FOR_REASON: dict[str, type[tls.Alert]] = {
    "no_certificate": _alert(tls.AlertDescription.certificate_required),
    "untrusted": _alert(tls.AlertDescription.unknown_ca),
    "expired": _alert(tls.AlertDescription.certificate_expired),
    "not_yet_valid": _alert(tls.AlertDescription.certificate_expired),
    "is_ca": _alert(tls.AlertDescription.bad_certificate),
    "revoked": _alert(tls.AlertDescription.certificate_revoked),
    "bad_crl": _alert(tls.AlertDescription.certificate_unknown),
    "bad_identity": _alert(tls.AlertDescription.bad_certificate),
    "wrong_role": _alert(tls.AlertDescription.access_denied),
    "wrong_federation": _alert(tls.AlertDescription.access_denied),
}


@dataclass(frozen=True)
class PeerPolicy:
    """What a connection demands of the peer's certificate."""

    ca_cert: x509.Certificate
    """The federation CA the peer's leaf must be issued by."""
    allowed_roles: frozenset[str]
    """Roles admitted on this endpoint (a client dialling an aggregator: {"aggregator"})."""
    federation: str
    """The federation the peer must belong to."""
    crl: Callable[[], x509.CertificateRevocationList | None]
    """Returns the CRL in force right now (called per handshake, so reloads apply)."""
    local: str = "?"
    """Our own identity, for log lines."""


def _claimed_identity(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "<no certificate>"
    try:
        return pki.identity_of(cert).spiffe_id
    except pki.PkiError:
        return f"<unidentified: {cert.subject.rfc4514_string()[:120]}>"


class _MutualTlsContext(tls.Context):
    """``tls.Context`` that demands and verifies the peer certificate on both sides.

    Instances are never constructed directly: :func:`install_mutual_tls` re-classes
    the Context aioquic built and then sets the three ``_sxfl_*`` attributes.
    """

    _sxfl_policy: PeerPolicy
    _sxfl_identity: pki.PeerIdentity | None
    _sxfl_rejection: pki.PeerRejected | None

    def _sxfl_verify(self) -> None:
        policy = self._sxfl_policy
        leaf = self._peer_certificate
        chain = [leaf, *self._peer_certificate_chain] if leaf is not None else []
        try:
            self._sxfl_identity = pki.verify_peer(
                chain,
                policy.ca_cert,
                crl=policy.crl(),
                allowed_roles=policy.allowed_roles,
                federation=policy.federation,
            )
        except pki.PeerRejected as exc:
            self._sxfl_rejection = exc
            log.warning("[%s] refused TLS peer %s: %s", policy.local, _claimed_identity(leaf), exc)
            raise _ALERT_FOR_REASON[exc.reason](f"peer certificate refused: {exc.reason}") from exc
        log.debug("[%s] verified TLS peer %s", policy.local, self._sxfl_identity)

    def _sxfl_require_verified(self) -> None:
        if self._sxfl_identity is None:
            self._sxfl_rejection = pki.PeerRejected("no_certificate")
            log.warning(
                "[%s] refused TLS peer %s: no verified certificate",
                self._sxfl_policy.local,
                _claimed_identity(self._peer_certificate),
            )
            raise _ALERT_FOR_REASON["no_certificate"]("peer certificate required")

    # Server side ----------------------------------------------------------------------

    def _server_handle_certificate(self, input_buf: Any, *args: Any) -> None:
        super()._server_handle_certificate(input_buf, *args)  # type: ignore[misc]
        if self._peer_certificate is None:  # empty Certificate message (RFC 8446 §4.4.2.4)
            self._sxfl_require_verified()

    def _server_handle_certificate_verify(self, input_buf: Any, *args: Any) -> None:
        super()._server_handle_certificate_verify(input_buf, *args)  # type: ignore[misc]
        self._sxfl_verify()

    def _server_handle_finished(self, input_buf: Any, *args: Any) -> None:
        self._sxfl_require_verified()
        super()._server_handle_finished(input_buf, *args)  # type: ignore[misc]

    # Client side ----------------------------------------------------------------------

    def _client_handle_certificate_verify(self, input_buf: Any, *args: Any) -> None:
        super()._client_handle_certificate_verify(input_buf, *args)  # type: ignore[misc]
        self._sxfl_verify()

    def _client_handle_finished(self, input_buf: Any, *args: Any) -> None:
        self._sxfl_require_verified()
        super()._client_handle_finished(input_buf, *args)  # type: ignore[misc]


def install_mutual_tls(connection: QuicConnection, policy: PeerPolicy) -> None:
    """Make ``connection`` (not yet initialised) demand and verify the peer's certificate."""
    check_aioquic()
    original_initialize = connection._initialize

    def _initialize(peer_cid: bytes) -> None:
        original_initialize(peer_cid)
        context = connection.tls
        # Only ever re-class the exact type we vetted; anything else means aioquic
        # (or someone) changed how contexts are built and the hook may be unsound.
        if type(context) is not tls.Context:
            raise UnsupportedAioquic(f"unexpected TLS context type {type(context)!r}")
        context.__class__ = _MutualTlsContext
        assert isinstance(context, _MutualTlsContext)
        context._sxfl_policy = policy
        context._sxfl_identity = None
        context._sxfl_rejection = None
        # No resumption: a PSK handshake would skip the certificate exchange.
        context.get_session_ticket_cb = None
        context.new_session_ticket_cb = None
        context.session_ticket = None
        if not connection.configuration.is_client:
            context._request_client_certificate = True

    # Instance attribute shadows the method for this one connection only.
    connection._initialize = _initialize  # type: ignore[method-assign]


def peer_identity(connection: QuicConnection) -> pki.PeerIdentity | None:
    """The verified peer identity of an mTLS connection, or None before/without it."""
    context = getattr(connection, "tls", None)
    if isinstance(context, _MutualTlsContext):
        return context._sxfl_identity
    return None


def peer_rejection(connection: QuicConnection) -> pki.PeerRejected | None:
    """Why *we* refused the peer's certificate, if we did."""
    context = getattr(connection, "tls", None)
    if isinstance(context, _MutualTlsContext):
        return context._sxfl_rejection
    return None


def build_quic_configuration(
    identity: TlsIdentity, config: TransportConfig, *, is_client: bool
) -> QuicConfiguration:
    """aioquic configuration for one side of a secure-xfl connection."""
    check_aioquic()
    ca_pem = identity.ca_certificate.public_bytes(serialization.Encoding.PEM)
    quic = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[config.alpn],
        idle_timeout=config.idle_timeout_s,
        max_datagram_size=config.max_datagram_size,
        max_data=config.flow_control_window_bytes,
        max_stream_data=config.flow_control_window_bytes,
        congestion_control_algorithm=config.congestion_control,
        # Clients also let aioquic check the server chain against the CA; hostname
        # checks are skipped (server_name=None) because identity is the SPIFFE URI.
        cadata=ca_pem,
        verify_mode=ssl.CERT_REQUIRED if is_client else ssl.CERT_NONE,
        server_name=None,
    )
    quic.certificate = identity.certificate
    quic.private_key = identity.private_key
    return quic


def make_policy(
    identity: TlsIdentity,
    allowed_roles: Collection[str],
    crl: Callable[[], x509.CertificateRevocationList | None],
) -> PeerPolicy:
    """A :class:`PeerPolicy` for ``identity``'s federation and CA."""
    roles = frozenset(allowed_roles)
    unknown = roles - set(pki.ROLES)
    if not roles or unknown:
        raise pki.PkiError(f"allowed_roles must be a non-empty subset of {pki.ROLES}")
    return PeerPolicy(
        ca_cert=identity.ca_certificate,
        allowed_roles=roles,
        federation=identity.federation,
        crl=crl,
        local=identity.identity.spiffe_id,
    )
