"""The key-holder process: decrypts aggregates for the aggregator, under policy and budget.

Only peers whose certificate names the ``aggregator`` role may connect. Each
decryption is checked by :class:`~secure_xfl.crypto.keyholder.KeyHolder`,
checked against the privacy budget, decrypted and validated in memory, marked in
the durable record, written to the signed ledger, and only then returned.

Crash safety: the aggregate sent again for a released round (a crash lost the
reply) gets the same answer with no new ledger line and no new ε; if the crash fell
between the record's mark and the ledger line, the retry writes that line, once.
A record or ledger that cannot be written refuses with ``storage_unavailable`` and
burns nothing. ``status`` says the last released round and its aggregate's digest,
so a restarted aggregator can reconcile.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization

from secure_xfl import failpoints
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.envelope import SignedStatement
from secure_xfl.crypto.errors import DecryptionRefused
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy, Release
from secure_xfl.crypto.lanes import check_context
from secure_xfl.crypto.pki import PeerIdentity
from secure_xfl.crypto.recordspec import RecordDPSpec
from secure_xfl.fsio import StorageError
from secure_xfl.kit import Kit
from secure_xfl.privacy.ledger import PrivacyLedger, read_ledger
from secure_xfl.privacy.ledger.writer import LedgerStorageError
from secure_xfl.privacy.record import RecordAccount
from secure_xfl.protocol import messages
from secure_xfl.protocol.rules import make_rule
from secure_xfl.services.runtime import install_stop_signals, parse_address, watch_crl
from secure_xfl.transport.limits import Limits, limits_table
from secure_xfl.transport.rpc import RpcServer

log = logging.getLogger("secure_xfl.keyholder")

LEDGER_FILE = "ledger.jsonl"


def keyholder_policy(kit: Kit) -> KeyHolderPolicy:
    """This key holder's own policy, from its own kit: nothing the aggregator sends counts."""
    cfg = kit.config
    p = cfg.privacy
    return KeyHolderPolicy(
        run=cfg.federation.run,
        min_clients=cfg.federation.min_clients,
        dp=cfg.dp_spec(),
        record=cfg.record_floor(),
        allow_no_dp=p.allow_no_dp,
        buffered=make_rule(cfg.round.rule).buffered,
        max_staleness=cfg.round.max_staleness,
        max_weight=1.0 if cfg.round.rule == "dynamic" else cfg.round.effective_weight_cap,
        max_attempts=p.max_refused_decryptions,
        min_effective_noise=None if p.min_effective_noise < 0 else p.min_effective_noise,
        masking=p.masking,
    )


class KeyHolderService:
    """Glue between the RPC server, the key holder's policy and the privacy ledger."""

    def __init__(self, kit: Kit, *, state_dir: Path | None = None) -> None:
        cfg = kit.config
        self.kit = kit
        self.preset = get_preset(cfg.federation.preset)
        ctx = kit.secret_context()
        check_context(ctx, self.preset, kit.config.lane_quant())
        self.state_dir = state_dir or kit.path / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ledger = PrivacyLedger(self.state_dir / LEDGER_FILE, kit.tls.private_key)
        # Per-silo record-level histories come from the clients' signed statements, which
        # the writer does not keep in memory: read them once, then step on every entry.
        self.records = RecordAccount.from_entries(
            read_ledger(self.ledger.path, kit.tls.private_key.public_key()), cfg.privacy.delta
        )
        self.rule = cfg.round.rule
        self.holder = KeyHolder(
            ctx=ctx,
            preset=self.preset,
            policy=keyholder_policy(kit),
            client_keys=kit.client_certificates(),
            state_dir=self.state_dir,
            before_release=self._check_budget,
            after_release=self._record_released,
            on_refused=self._record_refused,
            on_repeat=self._complete,
        )
        self._lock = asyncio.Lock()

    # -- policy hooks ------------------------------------------------------------------
    def _sample_rate(self, release: Release) -> float:
        enrolled = max(len(self.holder.client_keys), len(release.participants))
        return len(release.participants) / enrolled

    def projected_epsilon(self, release: Release) -> tuple[float, float]:
        """(federation ε, worst participant's ε) if this round were released.

        The federation figure uses the recorded sampling rate; a client's own
        figure counts only its rounds at rate 1, because participation in
        cross-silo runs is not secretly random. The budget binds both, exactly
        as ``secure-xfl audit`` checks them (one :class:`PrivacyBudget` for both).
        """
        budget = self.ledger.budget(release.run, self.kit.config.privacy.delta)
        fed, worst, _ = budget.projected(
            release.noise_multiplier, self._sample_rate(release), release.participants
        )
        return fed, worst

    @staticmethod
    def _record_specs(release: Release) -> dict[str, RecordDPSpec]:
        return {
            s.statement.client: s.statement.record
            for s in release.statements
            if s.statement.record is not None
        }

    def _check_budget(self, release: Release) -> None:
        if self.ledger.released(release.run, release.round):
            # The record lost a release the ledger has (a replaced state dir): never a
            # second decryption of the round, and nothing marked for it.
            raise DecryptionRefused("already_decrypted", f"round {release.round} is on the "
                                    "ledger as released")  # fmt: skip
        record = self.kit.config.privacy.record
        if record.enabled:
            why_r = self.records.over_budget(record.budget, self._record_specs(release))
            if why_r is not None:
                raise DecryptionRefused("record_budget_exceeded", f"round {release.round}: {why_r}")
        limit = self.kit.config.privacy.epsilon_budget
        if limit <= 0:
            return
        budget = self.ledger.budget(release.run, self.kit.config.privacy.delta)
        why = budget.would_exceed(
            limit, release.noise_multiplier, self._sample_rate(release), release.participants
        )
        if why is not None:
            raise DecryptionRefused("budget_exceeded", f"round {release.round}: {why}")

    def _record_refused(self, release: Release, reason: str) -> None:
        """A decryption refused after validation is still on the ledger, and charged."""
        self._stored(release, outcome="refused", reason=reason)

    def _record_released(self, release: Release) -> None:
        """The released entry, fsynced before the plaintext leaves."""
        self._stored(release)
        failpoints.hit("keyholder.after_ledger", release.round)

    def _complete(self, release: Release) -> None:
        """A repeat of a released round: its ledger line, if a crash or a full disk kept
        it back after the record's mark (exactly once: the ledger says whether)."""
        if self.ledger.released(release.run, release.round):
            return
        log.warning("round %d of run %s: the record marks it released but the ledger "
                    "lacks its entry; writing it now", release.round, release.run)  # fmt: skip
        self._record_released(release)

    def _stored(self, release: Release, **kw: Any) -> None:
        """:meth:`_record`, with a ledger that cannot be written refused as
        ``storage_unavailable`` (the round stays open for a retry)."""
        try:
            self._record(release, **kw)
        except (LedgerStorageError, StorageError) as exc:
            log.error("round %d of run %s: the ledger cannot be written (%s); refusing "
                      "until it can", release.round, release.run, exc)  # fmt: skip
            raise DecryptionRefused("storage_unavailable", str(exc)) from None

    def _record(
        self, release: Release, outcome: str = "released", reason: str | None = None
    ) -> None:
        p = self.kit.config.privacy
        rate = self._sample_rate(release)
        budget = self.ledger.budget(release.run, p.delta)
        eps, worst, _ = budget.projected(release.noise_multiplier, rate, release.participants)
        specs = self._record_specs(release)
        self.ledger.append(
            record_epsilon=self.records.projected(specs) if specs else None,
            outcome=outcome,
            reason=reason,
            client_epsilon=worst,
            run=release.run,
            round=release.round,
            participants=list(release.participants),
            enrolled=max(len(self.holder.client_keys), len(release.participants)),
            clip_norm=release.clip_norm,
            noise_multiplier=release.noise_multiplier,
            sample_rate=rate,
            delta=p.delta if release.delta is None else release.delta,
            rule=self.rule,
            epsilon=eps,
            statements=[self._statement_record(s) for s in release.statements],
            weight_scale=release.weight_scale,
        )
        for client, spec in specs.items():
            self.records.step(client, spec)

    def _statement_record(self, signed: SignedStatement) -> dict[str, str]:
        """A participant's signed statement and certificate, so the audit can check them."""
        name = signed.statement.client
        cert = self.holder.client_keys[name]
        return {
            "client": name,
            "signed": msgpack.packb(signed.to_wire(), use_bin_type=True).hex(),
            "cert": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        }

    def _note_run_complete(self, run: str, round: int) -> None:
        """After the last round of this kit's run (``federation.rounds``, 0-based): say
        so once. The key holder stays up (a next run, a late audit query) until SIGTERM."""
        rounds = self.kit.config.federation.rounds
        if run != self.kit.config.federation.run or round != rounds - 1:
            return
        released = sum(self.ledger.released(run, r) for r in range(rounds))
        log.info(
            "run %s complete (%d rounds released); staying up for the next run — "
            "send SIGTERM to stop",
            run,
            released,
        )

    # -- requests ----------------------------------------------------------------------
    async def handle(self, peer: PeerIdentity, data: bytes) -> bytes:
        msg = messages.decode(data, expect={"decrypt", "status"})
        if msg["t"] == "status":
            return self.status(messages.require(msg, "run", str, optional=True))
        blob = messages.require(msg, "aggregate", bytes)
        async with self._lock:  # one decryption at a time: the once-only record is sequential
            self.holder.client_keys = self.kit.client_certificates()  # pick up enrolments
            result = await asyncio.to_thread(self.holder.decrypt, blob)
        rel = result.release
        what = "re-sent" if result.repeat else "released"
        log.info("%s round %d of run %s to %s", what, rel.round, rel.run, peer)
        self._note_run_complete(rel.run, rel.round)
        reply = messages.encode(
            "plain",
            round=rel.round,
            vector=messages.pack_vector(result.vector),
            participants=list(rel.participants),
            total_weight=result.total_weight,
            noise_multiplier=rel.noise_multiplier,
            epsilon=self.ledger.spent(rel.run, self.kit.config.privacy.delta),
        )
        failpoints.hit("keyholder.before_reply", rel.round)
        return reply

    def status(self, run: str | None = None) -> bytes:
        """The ``info`` reply: this key holder's run, preset, cohort floor, ε spent, and
        the last released round of ``run`` (default: the kit's) with the digest of its
        aggregate (``-1`` and ``""`` when none), from the durable record."""
        run = run or self.kit.config.federation.run
        last, digest = self.holder.last_released(run)
        return messages.encode(
            "info",
            run=self.kit.config.federation.run,
            preset=self.preset.name,
            min_clients=self.holder.policy.min_clients,
            epsilon=self.ledger.spent(run, self.kit.config.privacy.delta),
            last_released=last,
            released_digest=digest,
        )


def request_limits(kit: Kit) -> Limits:
    """Largest acceptable request per message type: ``status`` is small; ``decrypt``
    carries one aggregate (an upload's worth of ciphertext plus a manifest of signed
    statements) of a layout the key holder only learns from the request itself, so it
    is bounded by the kit's ``transport.max_message_bytes``."""
    return limits_table({"status": 4 << 10, "decrypt": kit.config.transport.max_message_bytes})


async def serve_keyholder(kit: Kit, listen: str, *, ready: Any = None) -> None:
    """Run the key holder until SIGTERM/SIGINT."""
    service = KeyHolderService(kit)
    server = RpcServer(
        tls=kit.tls,
        allowed_roles=("aggregator",),
        handler=service.handle,
        config=kit.config.transport,
        limits=request_limits(kit),
    )
    host, port = parse_address(listen)
    bound = await server.start(host, port)
    stop = asyncio.Event()
    install_stop_signals(stop)
    log.info("key holder of run %s serving on %s:%d", kit.config.federation.run, host, bound)
    if ready is not None:
        ready(bound)
    try:
        await watch_crl(kit, server, stop)
    finally:
        await server.close()
        service.holder.close()
        log.info("key holder stopped")
