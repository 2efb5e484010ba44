"""Provisioning startup kits and loading them.

``provision`` creates the federation CA and one folder per party::

    OUT/ca/                     ca.pem, ca-key.pem (0600), crl.pem, revoked.json
    OUT/keyholder/              config.toml, ca.pem, cert.pem, key.pem, crl.pem,
                                ckks-secret.ctx (0600), clients/<name>.pem
    OUT/aggregator/             … ckks-public.ctx, clients/<name>.pem
    OUT/client-<name>/          … ckks-public.ctx

Only the key holder's kit holds the CKKS secret key; the CA key stays in
``OUT/ca`` and belongs offline once provisioning is done.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import tenseal as ts
import tomli_w
from cryptography import x509

from secure_xfl.config import (
    FederationSettings,
    KitConfig,
    PartySettings,
    config_to_dict,
    load_config,
)
from secure_xfl.crypto import pem, pki
from secure_xfl.crypto.context import (
    get_preset,
    public_context_bytes,
    read_context_file,
    write_secret_context,
)
from secure_xfl.crypto.lanes import new_context
from secure_xfl.errors import ConfigError
from secure_xfl.transport.config import TlsIdentity

log = logging.getLogger(__name__)

PUBLIC_CTX = "ckks-public.ctx"
SECRET_CTX = "ckks-secret.ctx"  # noqa: S105 - a file name, not a secret


def _party_dir(out: Path, role: str, name: str) -> Path:
    return out / (f"client-{name}" if role == "client" else role)


def _write_party(
    out: Path,
    ca_cert: x509.Certificate,
    ca_key: Any,
    cfg: KitConfig,
    role: str,
    name: str,
) -> Path:
    kit = _party_dir(out, role, name)
    kit.mkdir(parents=True, exist_ok=False, mode=0o700)
    ident = pki.PeerIdentity(cfg.federation.name, role, name)
    cert, key = pki.issue_certificate(ca_cert, ca_key, ident)
    pem.write_certificate(kit / "cert.pem", cert)
    pem.write_private_key(kit / "key.pem", key)
    pem.write_certificate(kit / "ca.pem", ca_cert)
    shutil.copy(out / "ca" / "crl.pem", kit / "crl.pem")
    party_cfg = replace(cfg, party=PartySettings(role=role, name=name))  # type: ignore[arg-type]
    (kit / "config.toml").write_text(_CONFIG_HEADER + tomli_w.dumps(config_to_dict(party_cfg)))
    return kit


_CONFIG_HEADER = """\
# secure-xfl startup kit configuration. Every key is documented in
# secure_xfl/config.py; unknown keys are refused. [federation], [privacy] and
# [round] must be identical in every kit of a run.
"""


def provision(
    out: Path,
    *,
    federation: str,
    clients: Iterable[str],
    cfg: KitConfig | None = None,
) -> dict[str, Path]:
    """Create a federation CA and every party's kit under ``out`` (which must not exist)."""
    names = list(clients)
    if len(set(names)) != len(names) or not names:
        raise ConfigError("client names must be unique and at least one is needed")
    # Check every name before writing anything: a bad one must not leave a half-made folder.
    for role, name in (("keyholder", "main"), *(("client", n) for n in names)):
        pki.PeerIdentity(federation, role, name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; refusing to overwrite a federation")
    base = cfg or KitConfig()
    run = base.federation.run
    if run == FederationSettings().run:
        run = f"{federation}-{secrets.token_hex(4)}"
    base = replace(base, federation=replace(base.federation, name=federation, run=run))
    preset = get_preset(base.federation.preset)
    (out / "ca").mkdir(parents=True, mode=0o700)
    ca_cert, ca_key = pki.create_ca(federation)
    pem.write_certificate(out / "ca" / "ca.pem", ca_cert)
    pem.write_private_key(out / "ca" / "ca-key.pem", ca_key)
    pem.write_crl(out / "ca" / "crl.pem", pki.build_crl(ca_cert, ca_key, []))
    (out / "ca" / "revoked.json").write_text("[]\n")

    kits = {
        "keyholder": _write_party(out, ca_cert, ca_key, base, "keyholder", "main"),
        "aggregator": _write_party(out, ca_cert, ca_key, base, "aggregator", "main"),
    }
    ctx = new_context(preset, base.lane_quant())
    write_secret_context(kits["keyholder"] / SECRET_CTX, ctx)
    public = public_context_bytes(ctx)
    (kits["aggregator"] / PUBLIC_CTX).write_bytes(public)
    for name in names:
        kits[f"client-{name}"] = _add_client(out, ca_cert, ca_key, base, name, public)
    log.info("provisioned federation %s run %s with clients %s", federation, run, names)
    return kits


def _add_client(
    out: Path, ca_cert: x509.Certificate, ca_key: Any, cfg: KitConfig, name: str, public: bytes
) -> Path:
    kit = _write_party(out, ca_cert, ca_key, cfg, "client", name)
    (kit / PUBLIC_CTX).write_bytes(public)
    # The servers learn the new client's certificate to check its signatures.
    for server in ("aggregator", "keyholder"):
        clients_dir = out / server / "clients"
        clients_dir.mkdir(exist_ok=True, mode=0o700)
        shutil.copy(kit / "cert.pem", clients_dir / f"{name}.pem")
    return kit


def _check_federation(out: Path) -> None:
    """``out`` is a folder made by :func:`provision` (its CA and aggregator kit are there)."""
    for part in ("ca/ca.pem", "ca/ca-key.pem", "ca/revoked.json", "aggregator/config.toml"):
        if not (out / part).is_file():
            raise ConfigError(
                f"{out} is not a federation folder made by 'secure-xfl provision' "
                f"(no {part}); create one with --federation and --clients"
            )


def add_client(out: Path, name: str) -> Path:
    """Enrol one more client into an existing federation folder."""
    _check_federation(out)
    cfg = load_config(out / "aggregator" / "config.toml")
    pki.PeerIdentity(cfg.federation.name, "client", name)  # a valid name, or PkiError
    kit = _party_dir(out, "client", name)
    if kit.exists():
        raise ConfigError(
            f"client {name!r} is already enrolled in {out} (kit {kit}); "
            "pick another name, or --revoke it first to retire its certificate"
        )
    ca_cert = pem.load_certificate(out / "ca" / "ca.pem")
    ca_key = pem.load_private_key(out / "ca" / "ca-key.pem")
    public = (out / "aggregator" / PUBLIC_CTX).read_bytes()
    return _add_client(out, ca_cert, ca_key, cfg, name, public)  # type: ignore[arg-type]


def revoke(out: Path, name: str, role: str = "client") -> int:
    """Revoke a party's certificate; writes the new CRL into every kit. Returns its serial."""
    _check_federation(out)
    kit = _party_dir(out, role, name)
    if not (kit / "cert.pem").is_file():
        enrolled = sorted(p.name.removeprefix("client-") for p in out.glob("client-*"))
        raise ConfigError(
            f"no {role} {name!r} in {out} (enrolled clients: {', '.join(enrolled) or 'none'})"
        )
    serial = pem.load_certificate(kit / "cert.pem").serial_number
    revoked = set(json.loads((out / "ca" / "revoked.json").read_text()))
    revoked.add(serial)
    (out / "ca" / "revoked.json").write_text(json.dumps(sorted(revoked)) + "\n")
    ca_cert = pem.load_certificate(out / "ca" / "ca.pem")
    ca_key = pem.load_private_key(out / "ca" / "ca-key.pem")
    crl = pki.build_crl(ca_cert, ca_key, revoked)  # type: ignore[arg-type]
    pem.write_crl(out / "ca" / "crl.pem", crl)
    for party in out.iterdir():
        if (party / "crl.pem").exists() and party.name != "ca":
            pem.write_crl(party / "crl.pem", crl)
    return serial


@dataclass(frozen=True)
class Kit:
    """A loaded startup kit."""

    path: Path
    """Kit folder."""
    config: KitConfig
    """Parsed ``config.toml``."""

    @classmethod
    def load(cls, path: Path, *, role: str | None = None) -> Kit:
        """Load and sanity-check a kit; ``role`` must match when given."""
        if not (path / "config.toml").is_file():
            raise ConfigError(f"{path} is not a startup kit (no config.toml)")
        kit = cls(path, load_config(path / "config.toml"))
        if role is not None and kit.config.party.role != role:
            raise ConfigError(
                f"{path} is the {kit.config.party.role}'s startup kit, "
                f"not a {role}'s: pass the {role}'s kit"
            )
        if kit.config.party.role != "keyholder" and (path / SECRET_CTX).exists():
            raise ConfigError(f"{path} holds a CKKS secret key but is not the key holder's kit")
        return kit

    @cached_property
    def tls(self) -> TlsIdentity:
        """Certificate, key, CA and CRL for the transport."""
        crl = self.path / "crl.pem"
        return TlsIdentity(
            cert=self.path / "cert.pem",
            key=self.path / "key.pem",
            ca_cert=self.path / "ca.pem",
            federation=self.config.federation.name,
            crl_path=crl if crl.exists() else None,
        )

    def public_context(self) -> ts.Context:
        """The CKKS public context (refused if it carries a secret key)."""
        return read_context_file(self.path / PUBLIC_CTX, require_secret=False)

    def secret_context(self) -> ts.Context:
        """The CKKS secret context (key holder only)."""
        return read_context_file(self.path / SECRET_CTX, require_secret=True)

    def client_certificates(self) -> dict[str, x509.Certificate]:
        """Enrolled clients whose certificates chain to our CA and are not revoked."""
        ca = pem.load_certificate(self.path / "ca.pem")
        crl_path = self.path / "crl.pem"
        crl = pem.load_crl(crl_path) if crl_path.exists() else None
        out: dict[str, x509.Certificate] = {}
        for path in sorted((self.path / "clients").glob("*.pem")):
            cert = pem.load_certificate(path)
            try:
                ident = pki.verify_peer(
                    [cert],
                    ca,
                    crl=crl,
                    allowed_roles=("client",),
                    federation=self.config.federation.name,
                )
            except pki.PeerRejected as exc:
                log.warning("ignoring client certificate %s: %s", path.name, exc)
                continue
            out[ident.name] = cert
        return out
