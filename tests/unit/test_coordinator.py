"""The sans-IO round state machine, driven in memory with real CKKS (no sockets, no clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto.codec import flatten, layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.errors import DuplicateUpdate
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.protocol.coordinator import (
    Coordinator,
    CoordinatorSettings,
    NotEnrolled,
    RoundClosed,
)
from secure_xfl.protocol.events import Finished, Offer, Wait
from secure_xfl.protocol.plan import model_digest
from secure_xfl.protocol.rules import ServerRule
from tests.conftest import contexts

KEYS = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("a", "b", "c")}
PUB = {n: k.public_key() for n, k in KEYS.items()}
NUMEL = 100


def make(min_clients: int = 2, rounds: int = 2, timeout: float = 10.0) -> Coordinator:
    _, public = contexts()
    return Coordinator(
        CoordinatorSettings(
            run="r", rounds=rounds, min_clients=min_clients, timeout_s=timeout, weight_cap=10.0
        ),
        ctx=public,
        preset=get_preset("xfl-default"),
        enrolled=lambda: PUB,
        model={"w": np.zeros(NUMEL, dtype=np.float32)},
        rule=ServerRule("fedavg"),
        now=0.0,
    )


def upload(core: Coordinator, name: str, value: float, weight: float = 1.0) -> bytes:
    offer = core.task(name, after=core.round - 1)
    assert isinstance(offer, Offer)
    _, public = contexts()
    layout = layout_of({k: torch.from_numpy(v) for k, v in offer.model.items()})
    vec = np.full(NUMEL, value)
    plan = offer.plan
    blob = protect_vector(
        vec,
        dp=None,
        ctx=public,
        preset=get_preset("xfl-default"),
        layout=layout,
        run="r",
        round=plan.round,
        client=name,
        signing_key=KEYS[name],
        weight=weight,
        plan_digest=plan.digest,
        base_model_digest=plan.model_digest,
    ).encode()
    core.upload(name, plan.round, blob)
    return blob


def keyholder(tmp: Path, min_clients: int = 2) -> KeyHolder:
    secret, _ = contexts()
    return KeyHolder(
        ctx=secret,
        preset=get_preset("xfl-default"),
        policy=KeyHolderPolicy(run="r", min_clients=min_clients),
        client_keys=PUB,
        state_dir=tmp,
    )


def finish_round(core: Coordinator, kh: KeyHolder, now: float) -> Any:
    req = core.handle_timer(now)
    assert req is not None
    out = kh.decrypt(req.aggregate)
    core.decrypted(req.round, out.vector, {"participants": out.release.participants}, now)
    return out


def test_full_run_in_memory(tmp_path: Path) -> None:
    core, kh = make(), keyholder(tmp_path)
    for name, v, w in (("a", 1.0, 1.0), ("b", 2.0, 2.0), ("c", 4.0, 1.0)):
        upload(core, name, v, w)
    finish_round(core, kh, 1.0)
    assert core.round == 1 and core.phase == "collecting"
    assert np.allclose(core.params, (1 + 4 + 4) / 4, atol=1e-3)
    for name in "abc":
        upload(core, name, 1.0)
    finish_round(core, kh, 2.0)
    assert core.phase == "finished" and core.ok
    assert core.task("a", after=1) == Finished(ok=True, reason="completed", rounds=2)
    assert np.allclose(core.params, 9 / 4 + 1, atol=1e-3)


def test_round_waits_for_everyone_until_the_deadline(tmp_path: Path) -> None:
    core, kh = make(timeout=10.0), keyholder(tmp_path)
    upload(core, "a", 1.0)
    upload(core, "b", 3.0)
    assert core.handle_timer(5.0) is None  # c may still come
    out = finish_round(core, kh, 10.0)  # deadline with 2 ≥ min_clients
    assert out.release.participants == ("a", "b")
    assert np.allclose(core.params, 2.0, atol=1e-3)


def test_too_few_clients_fails_the_run_after_give_up() -> None:
    core = make(min_clients=3, timeout=10.0)
    upload(core, "a", 1.0)
    assert core.handle_timer(15.0) is None and core.phase == "collecting"
    assert core.handle_timer(299.0) is None and core.phase == "collecting"
    assert core.handle_timer(301.0) is None
    assert core.phase == "finished" and not core.ok and "min_clients" in core.outcome


def test_duplicate_upload_is_refused_and_nothing_lost(tmp_path: Path) -> None:
    core, kh = make(), keyholder(tmp_path)
    blob = upload(core, "a", 1.0)
    with pytest.raises(DuplicateUpdate):
        core.upload("a", 0, blob)
    assert isinstance(core.task("a", after=-1), Wait)  # already contributed this round
    upload(core, "b", 3.0)
    upload(core, "c", 5.0)
    finish_round(core, kh, 1.0)
    assert np.allclose(core.params, 3.0, atol=1e-3)


def test_replayed_update_from_an_earlier_round_is_refused(tmp_path: Path) -> None:
    core, kh = make(), keyholder(tmp_path)
    old = upload(core, "a", 1.0)
    upload(core, "b", 1.0)
    upload(core, "c", 1.0)
    finish_round(core, kh, 1.0)
    with pytest.raises(RoundClosed):
        core.upload("a", 0, old)
    from secure_xfl.crypto.errors import AggregationError

    with pytest.raises(AggregationError, match="round 0"):
        core.upload("a", 1, old)  # the signed round inside says 0
    assert core.acc.count == 0


def test_uploads_while_decrypting_are_refused() -> None:
    core = make()
    for n in "abc":
        upload(core, n, 1.0)
    assert core.handle_timer(1.0) is not None and core.phase == "decrypting"
    with pytest.raises(RoundClosed):
        core.upload("a", 0, b"x")


def test_unknown_peer_is_refused() -> None:
    core = make()
    with pytest.raises(NotEnrolled):
        core.hello("mallory")
    with pytest.raises(NotEnrolled):
        core.task("mallory", after=-1)


def test_key_holder_refusal_ends_the_run_cleanly() -> None:
    core = make()
    for n in "abc":
        upload(core, n, 1.0)
    req = core.handle_timer(1.0)
    assert req is not None
    core.decrypt_failed(req.round, "bad_signature: a", 2.0)
    assert core.phase == "finished" and not core.ok and "bad_signature" in core.outcome
    assert isinstance(core.task("a", after=0), Finished)


def test_budget_refusal_is_a_clean_early_end() -> None:
    core = make()
    for n in "abc":
        upload(core, n, 1.0)
    req = core.handle_timer(1.0)
    assert req is not None
    core.decrypt_failed(req.round, "decryption_refused: budget_exceeded: ε", 2.0)
    assert core.ok and core.budget_exhausted and "privacy budget reached" in core.outcome


def test_task_carries_the_current_model() -> None:
    core = make()
    offer = core.task("a", after=-1)
    assert isinstance(offer, Offer) and offer.plan.round == 0
    assert offer.plan.layout_digest == layout_of({"w": torch.zeros(NUMEL)}).digest
    assert offer.plan.model_digest == model_digest(offer.model)
    assert np.array_equal(
        flatten({"w": torch.from_numpy(offer.model["w"])}, layout_of({"w": torch.zeros(NUMEL)})),
        np.zeros(NUMEL),
    )
