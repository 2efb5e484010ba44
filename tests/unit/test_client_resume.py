"""A client keeps its last sealed upload and re-sends it for the very same plan (issue 15).

Real kit, real CKKS and signatures, a real silo account; the aggregator is a fake
peer that acknowledges uploads and records their bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secure_xfl.config import KitConfig, PrivacySettings
from secure_xfl.crypto.context import get_preset
from secure_xfl.kit import Kit, provision
from secure_xfl.privacy.silo import STATE_FILE
from secure_xfl.protocol import messages
from secure_xfl.protocol.client import Action, Call, SealAndUpload, Train, Trained
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.protocol.proposal import CoordinatorSettings, propose_plan
from secure_xfl.services.client import ClientService
from secure_xfl.services.upload_cache import (
    CACHE_FILE,
    CachedUpload,
    decode_upload,
    load_upload,
    save_upload,
)
from secure_xfl.training.trainer import TrainResult
from secure_xfl.transport.errors import ConnectionClosed
from tests.unit.test_runtime_retry import WELCOME, _peer

NUMEL = 32


class CountingTrainer:
    """A record-level-capable trainer that counts how often it trained."""

    def __init__(self) -> None:
        self.calls = 0

    def records(self, hints: Mapping[str, Any]) -> int:
        return 64

    def train(
        self, model: dict[str, np.ndarray], round: int, settings: Mapping[str, Any]
    ) -> TrainResult:
        self.calls += 1
        rng = np.random.default_rng(self.calls)
        update = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in model.items()}
        return TrainResult(update=update, num_samples=40, loss=0.5, metrics={"throughput": 9.0})


class FakeAggregator:
    """Acknowledges every upload; keeps the bytes."""

    def __init__(self) -> None:
        self.connections = 1
        self.uploads: list[bytes] = []

    async def call(self, method: str, *, expect: Any, **fields: Any) -> dict[str, Any]:
        assert method == "upload", method
        self.uploads.append(fields["update"])
        return {"t": "ack", "round": fields["round"], "accepted": True, "count": 1}

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cfg = KitConfig(privacy=PrivacySettings(noise_multiplier=1.0))  # record-level DP on
    return provision(tmp_path_factory.mktemp("fed"), federation="f", clients=["a", "b"], cfg=cfg)


@pytest.fixture
def kit(kits: dict[str, Path], tmp_path: Path) -> Kit:
    """Client a's kit with a fresh state directory (no account, no cache)."""
    k = Kit.load(kits["client-a"], role="client")
    for name in (STATE_FILE, CACHE_FILE):
        (k.path / "state" / name).unlink(missing_ok=True)
    return k


def _plan(kit: Kit, round: int = 0, attempt: int = 0) -> tuple[RoundPlan, dict[str, np.ndarray]]:
    cfg = kit.config
    model = {"w": np.zeros(NUMEL, dtype=np.float32)}
    settings = CoordinatorSettings(
        run=cfg.federation.run, rounds=cfg.federation.rounds, min_clients=2, timeout_s=5.0,
        dp=cfg.dp_spec(), record=cfg.record_floor(),
    )  # fmt: skip
    plan = propose_plan(settings, round=round, model=model, preset=get_preset("xfl-default"),
                        rule="fedavg", enrolled=2, attempt=attempt)  # fmt: skip
    return plan, model


def _offer(service: ClientService, plan: RoundPlan, model: dict[str, np.ndarray]) -> Train:
    m = service.machine
    if m.state == "joining":
        m.start(0.0)
        m.on_reply("welcome", {"run": plan.run, "round": plan.round, "rounds": 3}, 0.0)
    msg = {"plan": plan.to_wire(), "model": messages.pack_tensors(model), "hints": {}}
    (act,) = m.on_reply("round", msg, 0.0)
    assert isinstance(act, Train)
    return act


def _run_round(service: ClientService, plan: RoundPlan, model: dict[str, np.ndarray]) -> bytes:
    """Offer ``plan``, let the service train (or not) and upload; the bytes it sent."""
    peer = FakeAggregator()
    service.peer = peer  # type: ignore[assignment]

    async def go() -> list[Action]:
        (seal,) = await service._perform(_offer(service, plan, model))
        assert isinstance(seal, SealAndUpload)
        return await service._perform(seal)

    after = asyncio.run(go())
    assert [type(a) for a in after] == [Call] and after[0].method == "task"  # type: ignore[union-attr]
    (blob,) = peer.uploads
    return blob


def _service(kit: Kit, trainer: CountingTrainer) -> ClientService:
    return ClientService(Kit.load(kit.path, role="client"), aggregator="127.0.0.1:9",
                         trainer=trainer)  # fmt: skip


def _charged(service: ClientService) -> int:
    assert service.silo is not None
    return len(service.silo.entries)


def test_the_cache_file_round_trips(kit: Kit) -> None:
    trainer = CountingTrainer()
    service = _service(kit, trainer)
    plan, model = _plan(kit)
    blob = _run_round(service, plan, model)
    cached = load_upload(kit.path / "state", client="a", cert=kit.tls.certificate, limit=1 << 30)
    assert cached is not None and cached.blob == blob
    assert (cached.run, cached.round, cached.attempt, cached.target) == (plan.run, 0, 0, 0)
    assert cached.plan_digest == plan.digest and cached.matches(plan)
    assert cached.trained.num_samples == 40 and cached.trained.loss == 0.5
    assert cached.trained.throughput == 9.0 and cached.trained.record is not None
    assert decode_upload(cached.encode(), client="a", cert=kit.tls.certificate) == cached
    path = kit.path / "state" / CACHE_FILE
    assert path.stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([CACHE_FILE, STATE_FILE])


def test_a_matching_plan_resends_the_same_bytes_untrained_and_uncharged(kit: Kit) -> None:
    first = _service(kit, CountingTrainer())
    plan, model = _plan(kit)
    blob = _run_round(first, plan, model)
    charged = _charged(first)
    assert charged == 1

    trainer = CountingTrainer()  # the client restarted; the aggregator re-offers the round
    again = _service(kit, trainer)
    assert _run_round(again, plan, model) == blob
    assert trainer.calls == 0
    assert _charged(again) == charged  # no new record-level charge, on disk either
    assert _charged(_service(kit, CountingTrainer())) == charged


@pytest.mark.parametrize("change", ["attempt", "round"])
def test_a_different_plan_trains_afresh_and_is_charged(kit: Kit, change: str) -> None:
    first = _service(kit, CountingTrainer())
    plan, model = _plan(kit)
    blob = _run_round(first, plan, model)

    trainer = CountingTrainer()
    again = _service(kit, trainer)
    other, model = _plan(kit, **{change: 1})
    fresh = _run_round(again, other, model)
    assert trainer.calls == 1 and fresh != blob
    assert _charged(again) == 2
    cached = load_upload(kit.path / "state", client="a", cert=kit.tls.certificate, limit=1 << 30)
    assert cached is not None and cached.blob == fresh and cached.matches(other)


def _corrupt(kit: Kit, kits: dict[str, Path], how: str) -> None:
    """Seal one upload, then damage the cache file the way ``how`` says."""
    _run_round(_service(kit, CountingTrainer()), *_plan(kit))
    path = kit.path / "state" / CACHE_FILE
    data = path.read_bytes()
    up = decode_upload(data, client="a", cert=kit.tls.certificate)
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge_header":
        path.write_bytes(b"SXFLUPL1" + (1 << 30).to_bytes(4, "big") + b"{}")
    elif how == "other_round":  # header edited; the signed statement says otherwise
        path.write_bytes(dataclasses.replace(up, round=1, target=1).encode())
    elif how == "other_client":  # b's file copied into a's kit
        b = Kit.load(kits["client-b"], role="client")
        for name in (STATE_FILE, CACHE_FILE):
            (b.path / "state" / name).unlink(missing_ok=True)
        _run_round(_service(b, CountingTrainer()), *_plan(b))
        path.write_bytes((b.path / "state" / CACHE_FILE).read_bytes())
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "empty", "huge_header", "other_round", "other_client"]
)
def test_a_damaged_cache_is_ignored_with_a_warning(
    kit: Kit, kits: dict[str, Path], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    _corrupt(kit, kits, how)
    caplog.set_level(logging.WARNING, logger="secure_xfl.client")
    trainer = CountingTrainer()
    service = _service(kit, trainer)  # never crashes
    assert "ignoring the cached upload" in caplog.text
    _run_round(service, *_plan(kit))
    assert trainer.calls == 1  # retrained: the file was not trusted


def test_an_oversized_cache_is_refused_before_it_is_read(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    _run_round(_service(kit, CountingTrainer()), *_plan(kit))
    caplog.set_level(logging.WARNING, logger="secure_xfl.client")
    assert load_upload(kit.path / "state", client="a", cert=kit.tls.certificate, limit=64) is None
    assert "more than the" in caplog.text


def test_a_cache_that_cannot_be_written_only_warns(
    kit: Kit, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="secure_xfl.client")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    up = CachedUpload("r", 0, 0, b"\x00" * 32, 0, Trained(1, None, None), b"x")
    assert save_upload(blocked, up) is False
    assert "cannot keep the sealed upload" in caplog.text


# -- riding out a restart: the transport and the state machine ---------------------------


def test_a_dropped_aggregator_is_reconnected_to_and_said_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    script: list[Any] = [
        None, WELCOME,  # connected once
        ConnectionClosed("closed (error 0x0)"),  # the aggregator went away mid-call
        ConnectionRefusedError(111, "refused"), ConnectionRefusedError(111, "refused"),
        None, WELCOME,  # a new process on the same address
    ]  # fmt: skip
    peer, _, _ = _peer(script, deadline=600.0)
    asyncio.run(peer.call("hello", expect={"welcome"}))
    assert peer.connections == 1
    asyncio.run(peer.call("hello", expect={"welcome"}))
    assert peer.connections == 2
    text = caplog.text
    assert text.count("aggregator at 127.0.0.1:4433 unreachable; reconnecting for up to 600 s") == 1
    assert "reconnected to aggregator at 127.0.0.1:4433 after" in text


def _machine_after_round(kit: Kit) -> tuple[ClientService, RoundPlan]:
    service = _service(kit, CountingTrainer())
    plan, model = _plan(kit, round=2)
    _run_round(service, plan, model)
    assert service.machine.last == 2 and service.machine.state == "idle"
    return service, plan


def test_after_a_reconnect_the_machine_says_hello_and_follows_a_restarted_aggregator(
    kit: Kit,
) -> None:
    service, plan = _machine_after_round(kit)
    m = service.machine
    assert m.reconnected(0.0) == [Call("hello", {})]
    welcome = {"run": plan.run, "round": 2, "rounds": 3, "phase": "collecting"}
    assert m.on_reply("welcome", welcome, 0.0) == []
    m.on_reply("wait", {"retry_s": 0.2}, 0.0)
    (ask,) = m.handle_timer(1.0)
    assert isinstance(ask, Call) and ask.fields["after"] == 1  # asks for round 2 again
    # a plain welcome later (no reconnect) changes nothing
    assert m.on_reply("welcome", {**welcome, "round": 0}, 1.0) == []
    assert m.last == 1


def test_an_upload_refused_for_a_re_proposed_plan_is_dropped_not_fatal(kit: Kit) -> None:
    service = _service(kit, CountingTrainer())
    plan, model = _plan(kit)

    async def go() -> list[Action]:
        (seal,) = await service._perform(_offer(service, plan, model))
        assert isinstance(seal, SealAndUpload)
        return service.machine.on_error("plan_mismatch", "plan digest differs", 0.0)

    (ask,) = asyncio.run(go())
    assert isinstance(ask, Call) and ask.method == "task"
    assert service.machine.state == "idle" and service.machine.rounds_done == []
