"""The key holder: decrypts aggregates, and only aggregates, under policy.

Every rule of DESIGN §2 is a check here with its own refusal reason, run
against the key holder's *own* policy: every signed DP spec must be at least
as strong as the policy's, every entry must name the same plan, base model
and DP spec (buffered async: earlier plans within the staleness bound), and
σ_eff is computed from what the clients signed, never from a figure the
aggregator sent. The budget hook runs, then the aggregate is decrypted and
validated in memory; only then do the durable once-only record (fsynced, with the
aggregate's digest) and the ledger hook run, so a malformed aggregate is refused
without burning its round and a crash or restart can never release a round twice.
The same aggregate (SHA-256) re-sent for a released round gets the same answer, with
no new ε or ledger line (``on_repeat`` only completes one a crash kept back).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import tenseal as ts

from secure_xfl import failpoints
from secure_xfl.crypto import pki
from secure_xfl.crypto.codec import chunk_lengths, decrypt_chunks, load_chunk
from secure_xfl.crypto.cohort import check_manifest_masks
from secure_xfl.crypto.context import CKKSPreset
from secure_xfl.crypto.dpspec import DPSpec, effective_noise
from secure_xfl.crypto.envelope import EncryptedAggregate, SignedStatement
from secure_xfl.crypto.errors import CodecError, DecryptionRefused, EnvelopeError
from secure_xfl.crypto.lanes import chunk_slots, decrypt_packed, load_packed
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.crypto.record import DecryptionRecord
from secure_xfl.crypto.recordspec import RecordDPFloor
from secure_xfl.crypto.release import l2_norm, release_bound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyHolderPolicy:
    """What the key holder requires before it decrypts (from its own kit only)."""

    run: str
    """The only run id this key holder serves."""
    min_clients: int
    """Fewest distinct, enrolled, signing clients an aggregate must cover."""
    dp: DPSpec | None = None
    """Weakest client-level DP every entry must have signed (``None``: no DP required)."""
    record: RecordDPFloor | None = None
    """Weakest record-level DP-SGD every entry must have signed (``None``: not required)."""
    min_effective_noise: float | None = None
    """Refuse aggregates whose effective noise multiplier falls below this (``None``:
    the policy's own σ, so no release ever carries less noise than the kit asks)."""
    max_weight: float = 1e6
    """Largest signed weight under aggregator weighting (client weighting: 1)."""
    max_attempts: int = 2
    """Refused decryptions (aggregates failing validation) allowed per round; each is
    charged to the budget, so this bounds what one malicious client can make it burn."""
    buffered: bool = False
    """Buffered asynchronous run: entries may have trained on earlier rounds' plans."""
    max_staleness: int = 4
    """Buffered async: how many rounds an entry's base round may trail the aggregate's."""
    allow_no_dp: bool = True
    """Release aggregates that carry neither client-level noise nor record-level DP-SGD
    noise from every entry. Library default: whatever ``dp``/``record`` demand (nothing
    when both are None); a kit's policy allows it only with ``privacy.allow_no_dp``."""
    masking: bool = False
    """Refuse packed aggregates without pairwise masks (see :mod:`.cohort`)."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError("max_staleness must be ≥ 0")
        if self.min_clients < 1:
            raise ValueError("min_clients must be ≥ 1")
        if self.min_effective_noise is not None and self.min_effective_noise < 0:
            raise ValueError("min_effective_noise must be ≥ 0")
        if not self.max_weight > 0 or self.max_attempts < 0:
            raise ValueError("max_weight must be > 0 and max_attempts ≥ 0")

    @property
    def noise_floor(self) -> float:
        """The smallest σ_eff this key holder releases."""
        if self.min_effective_noise is not None:
            return self.min_effective_noise
        return 0.0 if self.dp is None else self.dp.noise_multiplier


@dataclass(frozen=True)
class Release:
    """Facts about one decryption, handed to budget and ledger hooks."""

    run: str
    """Run id."""
    round: int
    """Round number."""
    participants: tuple[str, ...]
    """Sorted client names covered by the aggregate."""
    weights: tuple[float, ...]
    """Multiplier applied to each participant's update (same order)."""
    noise_multiplier: float
    """Effective σ of the released aggregate relative to its sensitivity, computed from
    the clients' signed DP specs."""
    clip_norm: float = 1.0
    """Sensitivity of the released sum to one client (max signed C times multiplier)."""
    delta: float | None = None
    """δ the clients signed (``None`` when no entry signed any DP)."""
    statements: tuple[SignedStatement, ...] = ()
    """Every participant's signed statement (same order), for the ledger and the audit."""
    weight_scale: float = 1.0
    """Aggregator-side divisor of the signed weights (1 under client weighting)."""


@dataclass(frozen=True)
class DecryptedAggregate:
    """The key holder's answer: the weighted average, never an individual update."""

    release: Release
    """What was released."""
    vector: np.ndarray
    """Σ wᵢ xᵢ / Σ wᵢ as a flat float64 vector."""
    total_weight: float
    """Σ wᵢ (signed weights)."""
    repeat: bool = False
    """The same aggregate was released before: this is that answer again, nothing new."""


class KeyHolder:
    """Holds the CKKS secret key and enforces the decryption policy."""

    def __init__(
        self,
        *,
        ctx: ts.Context,
        preset: CKKSPreset,
        policy: KeyHolderPolicy,
        client_keys: Mapping[str, Any],
        state_dir: Path,
        before_release: Callable[[Release], None] | None = None,
        after_release: Callable[[Release], None] | None = None,
        on_refused: Callable[[Release, str], None] | None = None,
        on_repeat: Callable[[Release], None] | None = None,
    ) -> None:
        if not ctx.has_secret_key():
            raise DecryptionRefused("no_secret_key", "the key holder needs the secret context")
        self.ctx = ctx
        self.preset = preset
        self.policy = policy
        self.client_keys = dict(client_keys)
        self.before_release = before_release
        self.after_release = after_release
        self.on_refused = on_refused
        self.on_repeat = on_repeat
        self.record = DecryptionRecord(Path(state_dir))

    def already_decrypted(self, run: str, round: int) -> bool:
        """Whether (run, round) was released before, across restarts."""
        return self.record.released(run, round)

    def last_released(self, run: str) -> tuple[int, str]:
        """(highest released round of ``run``, hex digest of its aggregate) from the
        durable record; ``(-1, "")`` when none was released."""
        return self.record.last_released(run)

    def check(self, agg: EncryptedAggregate, *, repeat: bool = False) -> Release:
        """Apply every policy rule; returns what would be released. ``repeat``: the
        same aggregate was released before, so the once-only rules do not apply."""
        pol = self.policy
        if agg.run != pol.run:
            raise DecryptionRefused("wrong_run", f"{agg.run!r} is not run {pol.run!r}")
        if agg.preset != self.preset.name:
            raise DecryptionRefused("wrong_preset", agg.preset)
        names = [s.statement.client for s in agg.manifest]
        if len(set(names)) != len(names):
            raise DecryptionRefused("duplicate_client", "a client appears twice in the manifest")
        digests = {s.statement.ciphertext_digest for s in agg.manifest}
        if len(digests) != len(names):
            raise DecryptionRefused("duplicate_ciphertext", "two entries share a ciphertext")
        shape = (agg.layout_digest, agg.preset, agg.numel, agg.weighting)
        for signed in agg.manifest:
            st = signed.statement
            if (st.run, st.round) != (agg.run, agg.round):
                raise DecryptionRefused("manifest_mismatch", f"{st.client!r} signed another round")
            if (st.layout_digest, st.preset, st.numel, st.weighting) != shape:
                raise DecryptionRefused("manifest_mismatch", f"{st.client!r} signed another shape")
            key = self.client_keys.get(st.client)
            if key is None:
                raise DecryptionRefused("unknown_client", st.client)
            try:
                pki.verify_signature(key, signed.signature, st.signing_bytes())
            except Exception:
                raise DecryptionRefused("bad_signature", st.client) from None
        self._check_quant(agg)
        check_manifest_masks([s.statement for s in agg.manifest], self.preset, pol.masking)
        self._check_plans(agg)
        if len(names) < pol.min_clients:
            raise DecryptionRefused(
                "too_few_clients", f"{len(names)} < min_clients {pol.min_clients}"
            )
        # A repeat is the answer already given, given again: not a second decryption.
        if not repeat and self.already_decrypted(agg.run, agg.round):
            raise DecryptionRefused("already_decrypted", f"run {agg.run!r} round {agg.round}")
        if not repeat and self.record.refused(agg.run, agg.round) >= pol.max_attempts:
            raise DecryptionRefused(
                "too_many_attempts",
                f"round {agg.round} was refused {pol.max_attempts} times after decryption",
            )
        self._check_weights(agg)
        if agg.weighting == "aggregator":
            weights = tuple(s.statement.weight / agg.weight_scale for s in agg.manifest)
        else:
            weights = tuple(1.0 for _ in agg.manifest)
        specs = [s.statement.dp for s in agg.manifest]
        if any(d is None for d in specs):
            sigma, sens, delta = 0.0, pol.dp.clip_norm if pol.dp else 1.0, None
        else:
            signed_specs = [d for d in specs if d is not None]
            try:
                sigma, sens = effective_noise(signed_specs, weights)
            except EnvelopeError as exc:
                raise DecryptionRefused("bad_weights", str(exc)) from None
            delta = signed_specs[0].delta
        if sigma < pol.noise_floor * (1 - 1e-12):
            aggw = agg.weighting == "aggregator"
            hint = "; aggregator-side weights lower σ_eff: use client weighting" if aggw else ""
            raise DecryptionRefused(
                "noise_too_low", f"effective σ {sigma:.3f} < floor {pol.noise_floor:g}{hint}"
            )
        recorded = all(
            s.statement.record is not None and s.statement.record.noise_multiplier > 0
            for s in agg.manifest
        )
        if sigma == 0 and not recorded:
            if not pol.allow_no_dp:
                raise DecryptionRefused(
                    "no_privacy", "neither client-level noise nor record-level DP-SGD noise "
                    "from every entry, and this key holder's kit does not allow_no_dp",
                )  # fmt: skip
            log.warning("round %d: releasing an aggregate with NO differential privacy "
                        "(allow_no_dp)", agg.round)  # fmt: skip
        order = sorted(range(len(names)), key=lambda i: names[i])
        return Release(
            run=agg.run,
            round=agg.round,
            participants=tuple(names[i] for i in order),
            weights=tuple(weights[i] for i in order),
            noise_multiplier=sigma,
            clip_norm=sens,
            delta=delta,
            statements=tuple(agg.manifest[i] for i in order),
            weight_scale=agg.weight_scale if agg.weighting == "aggregator" else 1.0,
        )

    def _check_weights(self, agg: EncryptedAggregate) -> None:
        """Every signed weight within this key holder's own bounds."""
        for signed in agg.manifest:
            w = signed.statement.weight
            hi = 1.0 if agg.weighting == "client" else self.policy.max_weight
            if not 0 < w <= hi or (agg.weighting == "aggregator" and w > agg.weight_scale):
                raise DecryptionRefused(
                    "weight_out_of_bounds",
                    f"{signed.statement.client!r} signed weight {w:g} outside (0, {hi:g}]",
                )

    def _check_plans(self, agg: EncryptedAggregate) -> None:
        """Every entry signed DP at least the policy's, and all trained on one plan."""
        pol = self.policy
        for signed in agg.manifest:
            st = signed.statement
            if pol.dp is not None:
                if st.dp is None:
                    raise DecryptionRefused("dp_weaker_than_policy", f"{st.client!r} signed no DP")
                why = st.dp.weaker_than(pol.dp)
                if why:
                    raise DecryptionRefused(
                        "dp_weaker_than_policy", f"{st.client!r}: " + "; ".join(why)
                    )
            if pol.record is not None:
                if st.record is None:
                    raise DecryptionRefused(
                        "record_dp_weaker_than_policy", f"{st.client!r} signed no record-level DP"
                    )
                why = st.record.weaker_than(pol.record)
                if why:
                    raise DecryptionRefused(
                        "record_dp_weaker_than_policy", f"{st.client!r}: " + "; ".join(why)
                    )
            stale = agg.round - st.base_round
            if stale < 0 or (stale > 0 and not pol.buffered) or stale > pol.max_staleness:
                raise DecryptionRefused(
                    "stale_update", f"{st.client!r} trained on round {st.base_round}"
                )
        first = agg.manifest[0].statement
        if len({s.statement.dp for s in agg.manifest}) != 1:
            raise DecryptionRefused("manifest_mismatch", "clients signed different DP specs")
        if not pol.buffered:
            plans = {(s.statement.plan_digest, s.statement.base_model_digest) for s in agg.manifest}
            if len(plans) != 1:
                raise DecryptionRefused(
                    "manifest_mismatch", "clients signed different plans or base models"
                )
        else:
            # Buffered async: one plan and one model per base round, never two.
            by_round: dict[int, set[tuple[bytes, bytes]]] = {}
            for s in agg.manifest:
                by_round.setdefault(s.statement.base_round, set()).add(
                    (s.statement.plan_digest, s.statement.base_model_digest)
                )
            if any(len(v) != 1 for v in by_round.values()):
                raise DecryptionRefused(
                    "manifest_mismatch", "clients signed different plans for one round"
                )
        if first.dp is not None and len(agg.manifest) < first.dp.min_clients:
            raise DecryptionRefused(
                "too_few_clients",
                f"{len(agg.manifest)} < the cohort K={first.dp.min_clients} the noise was "
                "calibrated for",
            )

    def _check_quant(self, agg: EncryptedAggregate) -> QuantSpec | None:
        """Packed aggregates: client-weighted, one signed quantisation, within its cohort."""
        quants = {s.statement.quant for s in agg.manifest}
        if not self.preset.packed:
            if quants != {None}:
                raise DecryptionRefused("manifest_mismatch", "quantised updates, unpacked preset")
            return None
        if agg.weighting != "client":
            raise DecryptionRefused("wrong_weighting", "packed aggregates are client-weighted")
        if len(quants) != 1 or None in quants:
            raise DecryptionRefused("manifest_mismatch", "clients signed different quantisations")
        (quant,) = quants
        assert quant is not None
        if len(agg.manifest) > quant.max_clients:
            raise DecryptionRefused(
                "too_many_clients", f"{len(agg.manifest)} > max_clients {quant.max_clients}"
            )
        return quant

    def decrypt(self, agg: EncryptedAggregate | bytes) -> DecryptedAggregate:
        """Check policy, decrypt and validate the weighted average, record the round
        durably, then return it (again, for the very aggregate released before)."""
        blob = agg.encode() if isinstance(agg, EncryptedAggregate) else bytes(agg)
        agg = agg if isinstance(agg, EncryptedAggregate) else EncryptedAggregate.decode(blob)
        digest = hashlib.sha256(blob).hexdigest()  # of the bytes as received
        repeat = self.record.released_digest(agg.run, agg.round) == digest
        release = self.check(agg, repeat=repeat)
        quant = self._check_quant(agg)
        if quant is None:
            lengths = list(chunk_lengths(agg.numel, self.preset.slots))
        else:
            lengths = chunk_slots(self.preset, quant, agg.numel)
        if len(agg.chunks) != len(lengths):
            raise EnvelopeError(f"aggregate has {len(agg.chunks)} chunks, expected {len(lengths)}")
        levels = self.preset.fresh_levels - (1 if agg.weighting == "aggregator" else 0)
        vectors = [
            load_chunk(self.ctx, c, self.preset, expected_len=n, levels=levels)
            if quant is None
            else load_packed(self.ctx, self.preset, quant, c, n)
            for c, n in zip(agg.chunks, lengths, strict=True)
        ]
        total = float(sum(s.statement.weight for s in agg.manifest))
        divisor = sum(release.weights) if agg.weighting == "aggregator" else total
        if self.before_release and not repeat:
            self.before_release(release)  # the budget: this decryption will be charged
        # Decrypt and validate in memory before anything is released: a malformed or
        # out-of-bounds aggregate is charged and refused, and its round stays open for
        # a retry with fresh noise from every client.
        try:
            if quant is None:
                total_sum = decrypt_chunks(vectors, agg.numel)
            else:
                n, masked = len(agg.manifest), agg.manifest[0].statement.mask is not None
                total_sum = decrypt_packed(vectors, self.preset, quant, n, agg.numel,
                                           masked=masked)  # fmt: skip
        except CodecError as exc:
            self._refuse(release, "aggregate_invalid", str(exc), charge=not repeat)
        self._validate(agg, release, total_sum, quant, charge=not repeat)
        vector = total_sum / divisor
        if repeat:
            if self.on_repeat:
                self.on_repeat(release)  # a ledger line a crash or a full disk kept back
            log.info("round %d of run %s re-sent: same aggregate, nothing new released",
                     agg.round, agg.run)  # fmt: skip
            return DecryptedAggregate(release, vector, total, repeat=True)
        failpoints.hit("keyholder.after_decrypt", agg.round)
        self.record.mark_released(agg.run, agg.round, digest)  # storage_unavailable if not
        failpoints.hit("keyholder.after_mark", agg.round)
        if self.after_release:
            self.after_release(release)  # the ledger line exists before the plaintext leaves
        log.info("decrypted run %s round %d over %d clients (σ_eff=%.3f)", agg.run,
                 agg.round, len(release.participants), release.noise_multiplier)  # fmt: skip
        return DecryptedAggregate(release=release, vector=vector, total_weight=total)

    def _validate(
        self,
        agg: EncryptedAggregate,
        release: Release,
        total_sum: np.ndarray,
        quant: QuantSpec | None,
        *,
        charge: bool = True,
    ) -> None:
        """Finite, and within the release bound of what the clients signed."""
        if not np.isfinite(total_sum).all():
            why = "decrypted values are not finite"
            self._refuse(release, "aggregate_invalid", why, charge=charge)
        specs = [s.statement.dp for s in agg.manifest]
        if any(d is None for d in specs):
            return  # no signed clip: no bound to hold the release to (policy allowed it)
        bound = release_bound(
            [d for d in specs if d is not None],
            [s.statement.weight for s in agg.manifest],
            [1.0 if agg.weighting == "client" else s.statement.weight / agg.weight_scale
             for s in agg.manifest],
            numel=agg.numel,
            preset=self.preset,
            quant=quant,
            client_weighted=agg.weighting == "client",
        )  # fmt: skip
        norm = l2_norm(total_sum)
        if norm > bound:
            self._refuse(
                release,
                "aggregate_out_of_bounds",
                f"‖sum‖ = {norm:.4g} > {bound:.4g}, the bound of what the clients signed",
                charge=charge,
            )

    def _refuse(self, release: Release, reason: str, detail: str, *, charge: bool) -> NoReturn:
        """Charge and record a decryption whose aggregate failed validation, then refuse
        (a repeat was charged when first released: it only refuses)."""
        log.warning("round %d of run %s refused after decryption: %s: %s",
                    release.round, release.run, reason, detail)  # fmt: skip
        if charge:
            try:
                if self.on_refused:
                    self.on_refused(release, reason)  # ledger and charge, before the record
            finally:  # even when the ledger cannot be written: the attempt still counts
                self.record.mark_refused(release.run, release.round, reason)
        raise DecryptionRefused(reason, detail)

    def close(self) -> None:
        """Release the state-directory lock."""
        self.record.close()
