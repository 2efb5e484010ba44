"""ClientRound and Coordinator driven together in memory through whole runs.

Real CKKS, real signatures, a real KeyHolder; no sockets and a simulated
clock. The small router below is what the services do over QUIC.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto.codec import layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.errors import DecryptionRefused
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.protect import seal_vector
from secure_xfl.errors import SecureXFLError
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.protocol import messages
from secure_xfl.protocol.client import (
    Action,
    Call,
    ClientRound,
    Decline,
    Done,
    SealAndUpload,
    Train,
    Trained,
)
from secure_xfl.protocol.coordinator import Coordinator, CoordinatorSettings
from secure_xfl.protocol.events import Finished, Offer, Wait
from secure_xfl.protocol.plan import ClientPolicy
from secure_xfl.protocol.rules import make_rule
from tests.conftest import contexts

NAMES = ("a", "b", "c")
KEYS = {n: ec.generate_private_key(ec.SECP256R1()) for n in NAMES}
PUB = {n: k.public_key() for n, k in KEYS.items()}
NUMEL = 64
POLICY_DP = DPSpec(clip_norm=1.0, noise_multiplier=0.5, min_clients=2)


@dataclass
class Sim:
    """A federation in memory: one coordinator, clients, a key holder and a clock."""

    core: Coordinator
    kh: KeyHolder
    clients: dict[str, ClientRound]
    now: float = 0.0
    slow: dict[str, float] = field(default_factory=dict)  # client -> training seconds
    queues: dict[str, deque[Action]] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)  # client -> finishes at
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    done: dict[str, Done] = field(default_factory=dict)
    unclipped: dict[str, int] = field(default_factory=dict)  # client -> bad uploads left
    log: list[str] = field(default_factory=list)

    def reply(self, name: str, act: Call) -> list[Action]:
        m, core = self.clients[name], self.core
        if act.method == "hello":
            return m.on_reply("welcome", core.hello(name), self.now)
        if act.method == "decline":
            core.decline(name, act.fields["round"], "x", "y", self.now)
            return m.on_reply("ack", {}, self.now)
        out = core.task(name, act.fields["after"], self.now, act.fields["attempt"])
        if isinstance(out, Finished):
            return m.on_reply("done", {"ok": out.ok, "reason": out.reason}, self.now)
        if isinstance(out, Wait):
            return m.on_reply("wait", {"retry_s": out.retry_s}, self.now)
        assert isinstance(out, Offer)
        wire = {
            "plan": out.plan.to_wire(),
            "model": messages.pack_tensors(out.model),
            "hints": out.hints,
        }
        return m.on_reply("round", wire, self.now)

    def perform(self, name: str, act: Action) -> list[Action]:
        m = self.clients[name]
        if isinstance(act, Call):
            return self.reply(name, act)
        if isinstance(act, Train):
            self.vectors[name] = np.full(NUMEL, 0.01 * (1 + NAMES.index(name)))
            self.training[name] = self.now + self.slow.get(name, 0.0)
            self.log.append(f"{name} trains round {act.plan.round}")
            return []
        if isinstance(act, SealAndUpload):
            _, public = contexts()
            layout = layout_of({"w": torch.zeros(NUMEL)})
            vec, protect = self.vectors[name], protect_vector
            if self.unclipped.get(name, 0) > 0:  # signs the plan's DP, skips clip and noise
                self.unclipped[name] -= 1
                vec, protect = np.full(NUMEL, 500.0 / np.sqrt(NUMEL)), seal_vector
            blob = protect(
                vec,
                dp=act.dp,
                weight=act.weight,
                weighting=act.plan.weighting,
                ctx=public,
                preset=get_preset("xfl-default"),
                layout=layout,
                run="r",
                round=act.round,
                client=name,
                signing_key=KEYS[name],
                plan_digest=act.plan.digest,
                base_round=act.base_round,
                base_model_digest=act.plan.model_digest,
            ).encode()
            try:
                self.core.upload(name, act.round, blob)
            except SecureXFLError as exc:
                self.log.append(f"{name} upload {act.round} refused: {exc.code}")
                return m.on_error(exc.code, str(exc), self.now)
            self.log.append(f"{name} uploaded {act.round} (base {act.base_round})")
            return m.on_reply("ack", {}, self.now)
        if isinstance(act, Decline):
            self.log.append(f"{name} declines {act.round}: {act.reason}")
            self.core.decline(name, act.round, act.reason, act.detail, self.now)
            return m.on_reply("ack", {}, self.now)
        assert isinstance(act, Done)
        self.done[name] = act
        return []

    def step_client(self, name: str) -> None:
        q = self.queues[name]
        if name in self.training:
            if self.training[name] > self.now:
                return
            del self.training[name]
            q.extend(self.clients[name].trained(Trained(num_samples=10, loss=1.0, throughput=None)))
        while q and name not in self.training:
            q.extend(self.perform(name, q.popleft()))
        if not q and name not in self.done and name not in self.training:
            q.extend(self.clients[name].handle_timer(self.now))

    def run(self, until: float = 5000.0, dt: float = 0.1) -> None:
        for n, m in self.clients.items():
            self.queues[n] = deque(m.start(self.now))
        while self.now < until and len(self.done) < len(self.clients):
            for n in self.clients:
                if n not in self.done:
                    self.step_client(n)
            req = self.core.handle_timer(self.now)
            if req is not None:
                try:
                    out = self.kh.decrypt(req.aggregate)
                except DecryptionRefused as exc:
                    self.core.decrypt_failed(req.round, exc, self.now)
                else:
                    info = {"participants": out.release.participants}
                    self.core.decrypted(req.round, out.vector, info, self.now)
            self.now += dt


def sim(
    tmp: Path,
    *,
    rule: str = "fedavg",
    rounds: int = 2,
    plan_dp: DPSpec | None = POLICY_DP,
    client_dp: dict[str, DPSpec] | None = None,
    min_clients: int = 2,
    timeout: float = 5.0,
) -> Sim:
    secret, public = contexts()
    core = Coordinator(
        CoordinatorSettings(
            run="r",
            rounds=rounds,
            min_clients=min_clients,
            timeout_s=timeout,
            dp=plan_dp,
            weighting="client",
            weight_cap=10.0,
            give_up_after_s=60.0,
        ),
        ctx=public,
        preset=get_preset("xfl-default"),
        enrolled=lambda: PUB,
        model={"w": np.zeros(NUMEL, dtype=np.float32)},
        rule=make_rule(rule),
        now=0.0,
    )
    kh = KeyHolder(
        ctx=secret,
        preset=get_preset("xfl-default"),
        policy=KeyHolderPolicy(
            run="r", min_clients=2, dp=POLICY_DP, buffered=make_rule(rule).buffered
        ),
        client_keys=PUB,
        state_dir=tmp,
    )
    clients = {
        n: ClientRound(
            n, ClientPolicy(run="r", dp=(client_dp or {}).get(n, POLICY_DP), min_clients=2)
        )
        for n in NAMES
    }
    return Sim(core=core, kh=kh, clients=clients)


def test_whole_run_all_clients_every_round(tmp_path: Path) -> None:
    s = sim(tmp_path, rounds=3)
    s.run()
    assert s.core.ok and len(s.core.history) == 3
    assert all(d.ok for d in s.done.values()) and set(s.done) == set(NAMES)
    assert all(m.rounds_done == [0, 1, 2] for m in s.clients.values())
    assert [r.participants for r in s.core.history] == [NAMES] * 3


def test_a_straggler_misses_the_round_and_rejoins(tmp_path: Path) -> None:
    s = sim(tmp_path, rounds=2, timeout=2.0)
    s.slow["c"] = 3.0  # trains past the deadline of every round
    s.run()
    assert s.core.ok
    assert [r.participants for r in s.core.history] == [("a", "b"), ("a", "b")]
    assert "c upload 0 refused: round_closed" in s.log
    assert s.clients["c"].rounds_done == []
    assert s.done["c"].ok  # missing a round is not a failure


def test_buffered_async_straggler_retargets_the_next_round(tmp_path: Path) -> None:
    s = sim(tmp_path, rule="async", rounds=3)
    # a and b close round 0 at t=0.5; c finishes at 0.7, finds round 0 closed and round 1
    # open, and re-seals the same update for round 1 (staleness 1, discounted weight).
    s.slow.update(a=0.5, b=0.5, c=0.7)
    s.run()
    assert s.core.ok
    assert any(line.startswith("c uploaded 1 (base 0)") for line in s.log), s.log
    assert s.clients["c"].rounds_done[0] == 1
    assert s.kh.already_decrypted("r", 2)


@pytest.mark.parametrize(
    "plan_dp",
    [
        DPSpec(clip_norm=1.0, noise_multiplier=0.0, min_clients=2),
        DPSpec(clip_norm=100.0, noise_multiplier=0.5, min_clients=2),
        DPSpec(clip_norm=1.0, noise_multiplier=0.5, min_clients=1),
        None,
    ],
    ids=["sigma0", "clip100", "k1", "no-dp"],
)
def test_a_weaker_plan_is_refused_by_every_client(tmp_path: Path, plan_dp: DPSpec | None) -> None:
    s = sim(tmp_path, plan_dp=plan_dp)
    s.run()
    assert not any("trains" in line or "uploaded" in line for line in s.log), s.log
    # The run ends as soon as refusals leave fewer than min_clients able to take part;
    # a client that had not asked yet hears why in the final "done".
    assert set(s.done) == set(NAMES) and not any(d.ok for d in s.done.values())
    assert sum(d.refused for d in s.done.values()) >= 2
    assert all("refused the plan" in d.reason for d in s.done.values())
    assert not s.core.ok and "refused the plan" in s.core.outcome
    assert not s.kh.already_decrypted("r", 0)


def test_a_stricter_plan_is_applied_as_proposed(tmp_path: Path) -> None:
    strict = DPSpec(clip_norm=0.5, noise_multiplier=1.0, min_clients=3)
    s = sim(tmp_path, plan_dp=strict, rounds=1)
    s.run()
    assert s.core.ok
    signed = {e.statement.dp for e in s.core.acc.result_manifest()} if s.core.acc.count else set()
    assert signed <= {strict}
    assert s.core.history[0].participants == NAMES


def test_one_client_with_a_stricter_kit_refuses_and_the_rest_carry_on(tmp_path: Path) -> None:
    s = sim(tmp_path, rounds=1, client_dp={"c": DPSpec(1.0, 2.0, 2)})
    s.run()
    assert s.core.ok and s.core.history[0].participants == ("a", "b")
    assert s.done["c"].refused and not s.done["c"].ok
    assert "c declines 0: plan_weaker_than_policy" in s.log


def test_replies_out_of_order_are_typed_errors() -> None:
    m = ClientRound("a", ClientPolicy(run="r", dp=POLICY_DP, min_clients=2))
    m.start(0.0)
    with pytest.raises(messages.ProtocolError):
        m.on_reply("ack", {}, 0.0)
    with pytest.raises(messages.ProtocolError):
        m.trained(Trained(1, None, None))
    with pytest.raises(messages.ProtocolError):
        m.on_reply("round", {"plan": [1, 2, 3], "model": [], "hints": {}}, 0.0)


def test_next_deadline_drives_waits() -> None:
    m = ClientRound("a", ClientPolicy(run="r", dp=POLICY_DP, min_clients=2))
    m.start(0.0)
    m.on_reply("welcome", {"run": "r", "round": 0}, 0.0)
    assert m.on_reply("wait", {"retry_s": 0.5}, 1.0) == []
    assert m.next_deadline() == pytest.approx(1.5)
    assert m.handle_timer(1.2) == []
    assert m.handle_timer(1.5) == [Call("task", {"after": -1, "attempt": 0})]


def test_an_unclipped_update_does_not_burn_the_round(tmp_path: Path) -> None:
    """c signs the plan's DP but uploads an update of norm 500 C once: the key holder
    refuses the aggregate after decryption (charged), the round is re-opened, every
    client retrains with fresh noise and the retry is released."""
    s = sim(tmp_path, rounds=1)
    s.unclipped["c"] = 1
    s.run()
    assert s.core.ok, s.core.outcome
    assert s.core.refused_cohorts == ["attempt 0: a, b, c (aggregate_out_of_bounds)"]
    assert s.kh.record.refused("r", 0) == 1 and s.kh.already_decrypted("r", 0)
    assert sum(line == "a trains round 0" for line in s.log) == 2  # retrained, fresh noise


def test_a_client_that_keeps_cheating_ends_the_run_with_the_cohorts_listed(
    tmp_path: Path,
) -> None:
    s = sim(tmp_path, rounds=2)
    s.unclipped["c"] = 99
    s.run()
    # Two refused decryptions (the key holder's max_attempts, each charged), then the key
    # holder refuses a third before decrypting and the coordinator stops the run.
    assert not s.core.ok and "too_many_attempts" in s.core.outcome
    assert s.core.outcome.count("aggregate_out_of_bounds") == 2
    assert s.kh.record.refused("r", 0) == 2
    assert not s.kh.already_decrypted("r", 0)
