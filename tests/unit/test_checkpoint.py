"""Checkpoint and resume of the sans-IO coordinator, driven in memory with real CKKS.

A coordinator runs rounds against a real KeyHolder; its snapshot goes through the
on-disk format (bytes) into a fresh coordinator, which must continue exactly where
the first one was: same parameters, round, attempt, optimiser state, history and the
same plan digest for the re-opened round, and it offers that round again to clients
that say they finished it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto.codec import layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.fsio import StorageError
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.protocol.checkpoint import (
    CheckpointError,
    Pending,
    decode_checkpoint,
    decode_pending,
    encode_checkpoint,
    encode_pending,
)
from secure_xfl.protocol.coordinator import Coordinator, CoordinatorSettings
from secure_xfl.protocol.events import Offer, Wait
from secure_xfl.protocol.rules import make_rule
from secure_xfl.services.aggregator_state import AggregatorFiles, ResumeRefused, reconcile
from tests.conftest import contexts

NAMES = ("a", "b", "c")
KEYS = {n: ec.generate_private_key(ec.SECP256R1()) for n in NAMES}
PUB = {n: k.public_key() for n, k in KEYS.items()}
NUMEL = 64
VALUES = {"a": 0.01, "b": 0.02, "c": 0.04}


def settings(**kw: Any) -> CoordinatorSettings:
    base: dict[str, Any] = {"run": "r", "rounds": 3, "min_clients": 2, "timeout_s": 10.0,
                            "weight_cap": 10.0}  # fmt: skip
    return CoordinatorSettings(**{**base, **kw})


def coordinator(state: Any = None, rule: str = "fedadam", **kw: Any) -> Coordinator:
    _, public = contexts()
    args: dict[str, Any] = {
        "ctx": public,
        "preset": get_preset("xfl-default"),
        "enrolled": lambda: PUB,
        "model": {"w": np.zeros(NUMEL, dtype=np.float32)},
        "rule": make_rule(rule, lr=0.1),
        "now": 100.0,
    }
    if state is None:
        return Coordinator(settings(**kw), **args)
    return Coordinator.restore(state, settings(**kw), **args)


def upload(core: Coordinator, name: str, *, after: int | None = None) -> None:
    offer = core.task(name, after=core.round - 1 if after is None else after, now=1.0)
    assert isinstance(offer, Offer), offer
    _, public = contexts()
    plan = offer.plan
    layout = layout_of({k: torch.from_numpy(v) for k, v in offer.model.items()})
    blob = protect_vector(
        np.full(NUMEL, VALUES[name] * (plan.round + 1)),
        dp=None,
        ctx=public,
        preset=get_preset("xfl-default"),
        layout=layout,
        run="r",
        round=plan.round,
        client=name,
        signing_key=KEYS[name],
        weight=1.0,
        plan_digest=plan.digest,
        base_model_digest=plan.model_digest,
        loss=1.0 + VALUES[name],
    ).encode()
    core.upload(name, plan.round, blob, throughput=100.0 * (1 + NAMES.index(name)))


def keyholder(tmp: Path) -> KeyHolder:
    secret, _ = contexts()
    return KeyHolder(
        ctx=secret,
        preset=get_preset("xfl-default"),
        policy=KeyHolderPolicy(run="r", min_clients=2),
        client_keys=PUB,
        state_dir=tmp,
    )


def release(core: Coordinator, kh: KeyHolder, aggregate: bytes, round: int) -> None:
    out = kh.decrypt(aggregate)
    info = {"participants": list(out.release.participants), "epsilon": 0.5}
    core.decrypted(round, out.vector, info, 50.0)


def full_round(core: Coordinator, kh: KeyHolder) -> None:
    for n in NAMES:
        upload(core, n)
    req = core.handle_timer(20.0)
    assert req is not None
    release(core, kh, req.aggregate, req.round)


def roundtrip(core: Coordinator, **kw: Any) -> Coordinator:
    data = encode_checkpoint(core.snapshot())
    state = decode_checkpoint(data, run="r", settings_digest=core.settings_digest, numel=NUMEL)
    return coordinator(state, **kw)


def test_restore_continues_exactly(tmp_path: Path) -> None:
    core, kh = coordinator(), keyholder(tmp_path / "kh")
    full_round(core, kh)
    assert core.rule.state()  # FedAdam's moments exist after one step
    back = roundtrip(core)
    assert np.array_equal(back.params, core.params)
    assert (back.round, back.attempt, back.phase) == (1, 0, "collecting")
    assert back.loss_ref == core.loss_ref == pytest.approx(1.01)
    assert back.throughputs == core.throughputs == {"a": 100.0, "b": 200.0, "c": 300.0}
    assert back.history == core.history
    for k, v in core.rule.state().items():
        assert np.array_equal(back.rule.state()[k], v)
    assert back.plan.digest == core.plan.digest  # the re-opened round's plan is identical
    assert back._plans.keys() == core._plans.keys()
    # Both go on alike — up to the CKKS noise of their separate encryptions (~1e-6
    # after FedAdam's normalisation) — and unlike a restore that lost the optimiser's
    # moments (~3e-2): the rule state really was carried over.
    lost = roundtrip(core)
    lost.rule.load_state({})
    full_round(core, kh)
    full_round(back, keyholder(tmp_path / "kh2"))
    full_round(lost, keyholder(tmp_path / "kh3"))
    assert np.allclose(back.params, core.params, atol=1e-4)
    assert not np.allclose(lost.params, core.params, atol=1e-3)
    assert back.round == core.round == 2


def test_restored_round_is_offered_again_to_clients_that_say_they_finished_it() -> None:
    core = coordinator()
    upload(core, "a")  # round 0 of the incarnation that is about to be lost
    assert isinstance(core.task("a", after=0, attempt=0), Wait)
    assert isinstance(core.task("b", after=0, attempt=0), Wait)  # not re-offered normally
    back = roundtrip(core)
    assert back.acc.count == 0  # uploads of the lost incarnation are gone
    offer = back.task("a", after=0, now=2.0, attempt=0)  # "I finished round 0"
    assert isinstance(offer, Offer) and offer.plan.digest == core.plan.digest
    upload(back, "a", after=0)  # the same signed plan: accepted again
    assert isinstance(back.task("a", after=0, attempt=0), Wait)  # now it is in the sum
    assert isinstance(back.task("b", after=-1, attempt=0), Offer)


def test_restored_round_times_out_even_when_only_re_sent_uploads_arrive() -> None:
    """After a resume, clients may re-send cached uploads without asking for the task:
    the round's deadline must still run (it closes with min_clients at the timeout)."""
    back = roundtrip(coordinator())
    _, public = contexts()
    plan, model = back.plan, back.model()
    layout = layout_of({k: torch.from_numpy(v) for k, v in model.items()})
    for name in ("a", "b"):  # never asked for the task: straight to upload
        blob = protect_vector(
            np.full(NUMEL, VALUES[name]), dp=None, ctx=public, preset=get_preset("xfl-default"),
            layout=layout, run="r", round=plan.round, client=name, signing_key=KEYS[name],
            weight=1.0, plan_digest=plan.digest, base_model_digest=plan.model_digest,
        ).encode()  # fmt: skip
        back.upload(name, plan.round, blob)
    assert back.announced_at is not None, "an upload must start the round's deadline"
    assert back.handle_timer(back.announced_at + 1.0) is None  # c may still come
    assert back.handle_timer(back.announced_at + 11.0) is not None  # 2 ≥ min_clients


def test_pending_aggregate_is_resumed_with_the_same_bytes(tmp_path: Path) -> None:
    core, kh = coordinator(), keyholder(tmp_path)
    for n in NAMES:
        upload(core, n)
    req = core.handle_timer(20.0)
    assert req is not None and core.phase == "decrypting"
    pending = decode_pending(encode_pending(Pending("r", 0, 0, req.aggregate)), run="r")
    back = roundtrip(core)  # snapshot while decrypting: round 0, collecting
    resent = back.resume_decrypting(pending.attempt, pending.aggregate, 30.0)
    assert resent.aggregate == req.aggregate and back.phase == "decrypting"
    assert back.record.participants == NAMES
    out = kh.decrypt(resent.aggregate)
    for c in (core, back):
        c.decrypted(0, out.vector, {}, 40.0)
    assert np.array_equal(back.params, core.params) and back.loss_ref == core.loss_ref
    assert back.plan.digest == core.plan.digest  # round 1 proposed identically
    with pytest.raises(CheckpointError, match="mismatch"):
        coordinator(core.snapshot()).resume_decrypting(0, req.aggregate, 50.0)  # round 0 ≠ 1


def test_finished_run_restores_finished(tmp_path: Path) -> None:
    core, kh = coordinator(rounds=1), keyholder(tmp_path)
    full_round(core, kh)
    assert core.phase == "finished" and core.ok
    back = roundtrip(core, rounds=1)
    assert back.phase == "finished" and back.ok and back.outcome == "completed"
    assert back.task("a", after=0).ok  # type: ignore[union-attr]


def _rewrite(data: bytes, **changes: Any) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["state"].tobytes())
    meta.update(changes)
    arrays["state"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: d[: len(d) // 2], "corrupt"),
        (lambda d: d[:200] + bytes([d[200] ^ 0xFF]) + d[201:], "corrupt"),
        (lambda d: b"not a zip at all", "corrupt"),
        (lambda d: _rewrite(d, version=99), "version"),
        (lambda d: _rewrite(d, run="other"), "foreign_run"),
        (lambda d: _rewrite(d, settings_digest="0" * 64), "settings_changed"),
        (lambda d: _rewrite(d, arrays="0" * 64), "corrupt"),
        (lambda d: _rewrite(d, phase="decrypting"), "corrupt"),
        (lambda d: _rewrite(d, round="1"), "corrupt"),
    ],
    ids=[
        "truncated",
        "flipped",
        "garbage",
        "version",
        "run",
        "settings",
        "digest",
        "phase",
        "type",
    ],
)
def test_a_bad_checkpoint_is_refused(damage: Any, reason: str) -> None:
    core = coordinator()
    data = damage(encode_checkpoint(core.snapshot()))
    with pytest.raises(CheckpointError) as err:
        decode_checkpoint(data, run="r", settings_digest=core.settings_digest, numel=NUMEL)
    assert err.value.reason == reason, err.value


def test_checkpoint_of_other_settings_or_model_is_refused() -> None:
    core = coordinator()
    data = encode_checkpoint(core.snapshot())
    for other in (coordinator(min_clients=3), coordinator(rule="fedyogi")):
        with pytest.raises(CheckpointError, match="settings_changed"):
            decode_checkpoint(data, run="r", settings_digest=other.settings_digest, numel=NUMEL)
        with pytest.raises(CheckpointError, match="settings_changed"):
            coordinator(core.snapshot(), min_clients=3)
    with pytest.raises(CheckpointError, match="mismatch"):
        decode_checkpoint(data, run="r", settings_digest=core.settings_digest, numel=NUMEL + 1)


def test_oversized_checkpoint_is_refused_before_parsing(tmp_path: Path) -> None:
    core = coordinator()
    data = encode_checkpoint(core.snapshot())
    with pytest.raises(CheckpointError, match="too_large"):
        decode_checkpoint(data, run="r", settings_digest=core.settings_digest, numel=NUMEL,
                          limit=len(data) - 1)  # fmt: skip
    files = AggregatorFiles(tmp_path, None, run="r", pending_limit=100)
    (tmp_path / "state.npz").write_bytes(b"\0" * (200 << 20))  # beyond the bound for 64
    with pytest.raises(StorageError, match="more than"):
        files.load_checkpoint(NUMEL, core.settings_digest)
    files.save_checkpoint(core.snapshot())
    assert files.load_checkpoint(NUMEL, core.settings_digest) is not None
    (tmp_path / "pending.bin").write_bytes(encode_pending(Pending("r", 0, 0, b"x" * 5000)))
    with pytest.raises(StorageError, match="more than"):
        files.load_pending()


def test_pending_file_is_checked() -> None:
    p = Pending("r", 2, 1, b"aggregate bytes")
    raw = encode_pending(p)
    assert decode_pending(raw, run="r") == p
    with pytest.raises(CheckpointError, match="foreign_run"):
        decode_pending(raw, run="other")
    with pytest.raises(CheckpointError, match="corrupt"):
        decode_pending(raw[:-1] + b"X", run="r")
    with pytest.raises(CheckpointError, match="corrupt"):
        decode_pending(b"garbage\n{}\n", run="r")


def test_reconcile_with_the_key_holder() -> None:
    p = Pending("r", 3, 0, b"agg")

    def decide(pending: Pending | None, **info: Any) -> str:
        return reconcile(run="r", round=3, attempt=0, pending=pending, info=info)

    assert decide(p) == "resend"  # an older key holder: status says nothing
    assert decide(None) == "reopen"
    assert decide(p, last_released=2, released_digest="x") == "resend"  # not released yet
    assert decide(p, last_released=3, released_digest=p.digest) == "resend"  # same answer
    assert decide(None, last_released=2, released_digest="") == "reopen"
    assert decide(Pending("r", 2, 0, b"old"), last_released=2, released_digest="") == "stale"
    assert decide(Pending("r", 3, 0, b"agg"), last_released=-1, released_digest="") == "resend"
    with pytest.raises(ResumeRefused, match="another aggregate"):
        decide(p, last_released=3, released_digest="f" * 64)
    with pytest.raises(ResumeRefused, match="another aggregate"):
        decide(p, last_released=4, released_digest="f" * 64)
    with pytest.raises(ResumeRefused, match="no pending aggregate"):
        decide(None, last_released=3, released_digest="f" * 64)
    with pytest.raises(ResumeRefused, match="ahead of the checkpoint"):
        decide(Pending("r", 4, 0, b"agg"))
