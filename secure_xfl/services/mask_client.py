"""A client's glue for masked rounds: fresh key pairs and cohorts checked against its kit.

The machine (:class:`~secure_xfl.protocol.client.ClientRound`) decides when; this holds
the one secret of a masked round, the X25519 private key of the current (round,
epoch), and checks every relayed cohort against this kit's own CA, CRL and
``min_clients`` before a single mask is derived from it.
"""

from __future__ import annotations

import logging
from typing import Any

from secure_xfl.crypto import pem
from secure_xfl.crypto.cohort import CohortMask, verify_cohort
from secure_xfl.crypto.masking import MaskKeyPair
from secure_xfl.kit import Kit
from secure_xfl.protocol.client import PublishKey, SealAndUpload
from secure_xfl.transport.errors import TransportError

log = logging.getLogger("secure_xfl.client")

__all__ = ["MaskKeys"]


class MaskKeys:
    """One client's mask keys: :meth:`publish` a fresh one, :meth:`cohort` to mask."""

    def __init__(self, kit: Kit, *, min_clients: int) -> None:
        cfg = kit.config
        self.name, self.run = cfg.party.name, cfg.federation.run
        self.federation, self.min_clients = cfg.federation.name, min_clients
        self._signing_key = kit.tls.private_key
        self._ca = pem.load_certificate(kit.path / "ca.pem")
        crl = kit.tls.crl_path
        self._crl = pem.load_crl(crl) if crl is not None else None
        self._pair: tuple[int, int, MaskKeyPair] | None = None

    def publish(self, act: PublishKey) -> list[Any]:
        """A fresh key pair for (round, epoch); returns the signed public half's wire form."""
        pair = MaskKeyPair.generate()
        self._pair = (act.round, act.epoch, pair)
        signed = pair.sign(run=self.run, round=act.round, attempt=act.epoch, client=self.name,
                           signing_key=self._signing_key)  # fmt: skip
        return signed.to_wire()

    def cohort(self, act: SealAndUpload) -> CohortMask | None:
        """The verified cohort mask for ``act`` (``None``: an unmasked round); a cohort this
        kit refuses raises :class:`~secure_xfl.crypto.errors.MaskError`."""
        if act.members is None:
            return None
        if self._pair is None or self._pair[:2] != (act.round, act.epoch):
            raise TransportError(f"no mask key of round {act.round} epoch {act.epoch} here")
        rnd, epoch, pair = self._pair
        keys = verify_cohort(
            act.members, ca=self._ca, crl=self._crl, federation=self.federation, run=self.run,
            round=rnd, epoch=epoch, own_name=self.name, own=pair, min_size=self.min_clients,
        )  # fmt: skip
        log.info("round %d epoch %d: masking for a verified cohort of %d (%s)", rnd, epoch,
                 len(keys), ", ".join(k.client for k in keys))  # fmt: skip
        return CohortMask(self.run, rnd, epoch, self.name, pair, keys)
