"""Streaming weighted sums on ciphertexts (the aggregator's only computation).

Memory is one running sum plus the update being added, whatever the number
of clients. An update is fully parsed and checked before it touches the sum,
so a bad update is refused without disturbing what was already accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tenseal as ts

from secure_xfl.crypto import pki
from secure_xfl.crypto.codec import chunk_lengths, load_chunk
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.envelope import (
    EncryptedAggregate,
    ProtectedUpdate,
    SignedStatement,
    Weighting,
)
from secure_xfl.crypto.errors import (
    AggregationError,
    DuplicateUpdate,
    LayoutMismatch,
    SignatureInvalid,
    WeightOutOfBounds,
)
from secure_xfl.crypto.lanes import chunk_slots, load_packed
from secure_xfl.crypto.packing import QuantSpec

log = logging.getLogger(__name__)

#: Maps a client name to its verification key (public key or certificate).
KeyLookup = Callable[[str], Any]


class Accumulator:
    """Accumulates one round's protected updates into an encrypted weighted sum.

    ``weighting="aggregator"`` multiplies client i's ciphertext by
    ``weight_i / weight_scale`` (one rescale, needs a depth-1 preset);
    ``weighting="client"`` expects pre-weighted updates and only adds.

    With a packed preset only client weighting is allowed, every update must
    sign the same quantisation (``quant``, or the first update's) and at most
    ``quant.max_clients`` updates are accepted, so no lane can overflow.
    """

    def __init__(
        self,
        *,
        ctx: ts.Context,
        preset: CKKSPreset,
        run: str,
        round: int,
        layout_digest: bytes,
        numel: int,
        key_for: KeyLookup,
        weighting: Weighting = "aggregator",
        weight_scale: float = 1.0,
        quant: QuantSpec | None = None,
    ) -> None:
        if preset.packed and weighting != "client":
            raise AggregationError(
                f"preset {preset.name!r} packs integers: aggregator-side weights are refused, "
                "use client weighting"
            )
        if quant is not None and not preset.packed:
            raise AggregationError(f"preset {preset.name!r} is not packed; quant must be None")
        if weighting == "aggregator" and preset.depth < 1:
            raise AggregationError(
                f"preset {preset.name!r} has no multiplicative depth; use client weighting"
            )
        if not weight_scale > 0:
            raise AggregationError("weight_scale must be > 0")
        self.ctx = ctx
        self.preset = preset
        self.run = run
        self.round = round
        self.layout_digest = layout_digest
        self.numel = numel
        self.key_for = key_for
        self.weighting: Weighting = weighting
        self.weight_scale = weight_scale
        self.quant = quant
        self._lengths: list[int] = list(
            chunk_slots(preset, quant, numel)
            if quant is not None
            else chunk_lengths(numel, preset.slots)
        )
        self._sum: list[Any] | None = None  # CKKS or BFV vectors
        self._manifest: list[SignedStatement] = []
        self._clients: set[str] = set()

    @property
    def clients(self) -> frozenset[str]:
        """Clients whose updates are in the sum."""
        return frozenset(self._clients)

    @property
    def count(self) -> int:
        """Number of accepted updates."""
        return len(self._manifest)

    def multiplier(self, signed: SignedStatement) -> float:
        """The plaintext scalar this update is multiplied by (1.0 under client weighting)."""
        if self.weighting == "client":
            return 1.0
        # Signed weights only: the key holder normalises with the same numbers.
        return signed.statement.weight / self.weight_scale

    def check(self, update: ProtectedUpdate, *, peer: str | None = None) -> None:
        """Every check :meth:`add` makes before touching ciphertexts."""
        st = update.statement
        if peer is not None and st.client != peer:
            raise AggregationError(f"peer {peer!r} uploaded an update signed as {st.client!r}")
        if st.run != self.run:
            raise AggregationError(f"update for run {st.run!r}, this is run {self.run!r}")
        if st.round != self.round:
            raise AggregationError(f"update for round {st.round}, this is round {self.round}")
        if st.client in self._clients:
            raise DuplicateUpdate(f"client {st.client!r} already contributed to this round")
        if st.layout_digest != self.layout_digest or st.numel != self.numel:
            raise LayoutMismatch(f"update from {st.client!r} has a different tensor layout")
        if st.preset != self.preset.name:
            raise AggregationError(f"update uses preset {st.preset!r}, not {self.preset.name!r}")
        if st.weighting != self.weighting:
            raise AggregationError(f"update is {st.weighting}-weighted; round is {self.weighting}")
        lengths = self._check_quant(update)
        if len(update.chunks) != len(lengths):
            raise AggregationError(f"{len(update.chunks)} chunks, expected {len(lengths)}")
        try:
            key = self.key_for(st.client)
        except KeyError:
            raise AggregationError(f"client {st.client!r} is not enrolled") from None
        try:
            pki.verify_signature(key, update.signed.signature, st.signing_bytes())
        except Exception as exc:
            raise SignatureInvalid(f"signature of {st.client!r} does not verify") from exc
        # Checked before any ciphertext is touched: one client signing weight 1e12 must
        # not shrink every other contribution to nothing.
        if self.weighting == "client" and not 0 < st.weight <= 1.0:
            raise WeightOutOfBounds(
                f"client-applied weight {st.weight} of {st.client!r} is outside (0, 1]"
            )
        mult = self.multiplier(update.signed)
        if not 0 < mult <= 1.0:
            raise WeightOutOfBounds(
                f"weight {st.weight} of {st.client!r} exceeds max_weight {self.weight_scale}"
            )

    def _check_quant(self, update: ProtectedUpdate) -> list[int]:
        """Quantisation rules; returns the expected slots per chunk."""
        quant = update.statement.quant
        if not self.preset.packed:
            if quant is not None:
                raise AggregationError("a quantised update for a preset that does not pack")
            return self._lengths
        if quant is None:
            raise AggregationError(f"preset {self.preset.name!r} needs a quantised update")
        if self.quant is not None and quant != self.quant:
            raise AggregationError(f"update quantisation {quant} differs from {self.quant}")
        if self.count >= quant.max_clients:
            raise AggregationError(
                f"the sum already holds max_clients={quant.max_clients} packed updates"
            )
        if self.quant is None:
            return chunk_slots(self.preset, quant, self.numel)
        return self._lengths

    def add(
        self,
        update: ProtectedUpdate | bytes,
        *,
        peer: str | None = None,
        also: Callable[[ProtectedUpdate], None] | None = None,
    ) -> None:
        """Verify and add one update; on any error the running sum is unchanged.

        ``also`` runs a caller's own check (e.g. the round plan) after this one's
        identity and signature checks and before any ciphertext is touched.
        """
        if isinstance(update, bytes | bytearray | memoryview):
            update = ProtectedUpdate.decode(bytes(update))
        self.check(update, peer=peer)
        if also is not None:
            also(update)
        quant = update.statement.quant
        lengths = self._check_quant(update)
        vectors = [
            load_chunk(self.ctx, c, self.preset, expected_len=n)
            if quant is None
            else load_packed(self.ctx, self.preset, quant, c, n)
            for c, n in zip(update.chunks, lengths, strict=True)
        ]
        mult = self.multiplier(update.signed)
        if self.weighting == "aggregator":
            for v in vectors:
                v.mul_(mult)
        if self._sum is None:
            self._sum = vectors
        else:
            for acc, v in zip(self._sum, vectors, strict=True):
                acc.add_(v)
        if quant is not None and self.quant is None:
            self.quant, self._lengths = quant, list(lengths)  # the first update fixes it
        self._manifest.append(update.signed)
        self._clients.add(update.statement.client)
        log.debug("round %s: added update of %s (%d so far)", self.round, peer, self.count)

    def result_manifest(self) -> tuple[SignedStatement, ...]:
        """The signed statements accepted so far (no ciphertexts)."""
        return tuple(self._manifest)

    def result(self) -> EncryptedAggregate:
        """The encrypted aggregate with its manifest, for the key holder."""
        if self._sum is None:
            raise AggregationError("no updates accumulated")
        return EncryptedAggregate(
            run=self.run,
            round=self.round,
            layout_digest=self.layout_digest,
            preset=self.preset.name,
            numel=self.numel,
            weighting=self.weighting,
            weight_scale=self.weight_scale,
            chunks=tuple(bytes(v.serialize()) for v in self._sum),
            manifest=tuple(self._manifest),
        )
