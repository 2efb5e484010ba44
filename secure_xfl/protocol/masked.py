"""The aggregator's side of one masked epoch: collect signed keys, fix the cohort, relay.

A masked round (``plan.masked``) runs in epochs. In each, clients that finished
training publish a fresh X25519 key signed with their certificate key
(:meth:`MaskEpoch.add_key`); the coordinator fixes the cohort once every able client
published one, or at the round's deadline with at least ``min_clients``
(:meth:`MaskEpoch.fix`); each member then fetches every member's key and certificate
(:meth:`MaskEpoch.members_for`), masks and uploads, and an upload counts only if it
signed exactly this cohort's claim (:meth:`MaskEpoch.check_upload`). If a member does
not upload in time the coordinator starts a new epoch with fresh keys: the incomplete
masked sum is discarded (decrypted, it would be uniform), and the members that did
upload re-mask the update they already trained (no retraining, no new record-level
charge). Sans-IO, like :mod:`.coordinator`: no clock but the ``now`` passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from secure_xfl.crypto.cohort import MaskClaim, cohort_to_wire
from secure_xfl.crypto.envelope import UpdateStatement
from secure_xfl.crypto.masking import SignedMaskKey, cohort_digest
from secure_xfl.errors import TrainingError
from secure_xfl.protocol.events import PlanMismatch, RoundClosed

log = logging.getLogger("secure_xfl.protocol.coordinator")

__all__ = ["MaskEpoch"]


def certificate_pem(cert: Any) -> bytes:
    """A client's certificate as relayed with its key (clients verify it themselves)."""
    if not isinstance(cert, x509.Certificate):
        raise TrainingError("masked rounds need the clients' X.509 certificates")
    return cert.public_bytes(serialization.Encoding.PEM)


class MaskEpoch:
    """Keys and cohort of one (run, round, epoch)."""

    def __init__(self, run: str, round: int, epoch: int) -> None:
        self.run, self.round, self.epoch = run, round, epoch
        self.keys: dict[str, SignedMaskKey] = {}
        self.cohort: tuple[str, ...] | None = None
        self.claim: MaskClaim | None = None
        self.fixed_at: float | None = None
        self._members: list[list[Any]] = []

    def _check(self, round: int, epoch: int) -> None:
        if (round, epoch) != (self.round, self.epoch):
            raise RoundClosed(f"round {round} epoch {epoch} is not the open masked epoch "
                              f"(round {self.round}, epoch {self.epoch})")  # fmt: skip

    def add_key(self, peer: str, round: int, epoch: int, wire: object, cert: Any) -> None:
        """A client published its key (verified against its certificate here too)."""
        self._check(round, epoch)
        if self.cohort is not None:
            raise RoundClosed(f"the cohort of round {round} epoch {epoch} is already fixed")
        key = SignedMaskKey.from_wire(wire)
        key.verify(cert, run=self.run, round=round, attempt=epoch, client=peer)
        if peer in self.keys and self.keys[peer] != key:
            raise PlanMismatch("mask_mismatch", f"{peer!r} already published another key")
        self.keys[peer] = key

    def fix(self, pem: Callable[[str], bytes], now: float) -> None:
        """Fix the cohort as the clients that published keys."""
        names = tuple(sorted(self.keys))
        keys = [self.keys[n] for n in names]
        self.claim = MaskClaim(self.epoch, names, cohort_digest(keys))
        self._members = cohort_to_wire([(self.keys[n], pem(n)) for n in names])
        self.cohort, self.fixed_at = names, now
        log.info("round %d epoch %d: cohort fixed (%s)", self.round, self.epoch, ", ".join(names))

    def members_for(self, peer: str, round: int, epoch: int) -> list[list[Any]] | None:
        """The relayed cohort for ``peer`` (``None``: not fixed yet, ask again)."""
        self._check(round, epoch)
        if self.cohort is None:
            return None
        if peer not in self.cohort:
            raise RoundClosed(f"{peer!r} is not in the fixed cohort of round {round}")
        return self._members

    def check_upload(self, st: UpdateStatement) -> None:
        """An upload counts only if it signed this epoch's claim (the masks cancel)."""
        if self.claim is None or self.cohort is None or st.client not in self.cohort:
            raise PlanMismatch("mask_mismatch", f"{st.client!r} is not in a fixed cohort")
        if st.mask != self.claim:
            raise PlanMismatch("mask_mismatch", f"{st.client!r} masked for another cohort")
