"""Masked rounds: ClientRound and Coordinator in memory, with real masks and CKKS.

Real X.509 client certificates from a federation CA, real X25519 keys, the packed
preset and a real KeyHolder whose kit requires masks; a simulated clock. The router
below is what the services do over QUIC (``mask_key``, ``cohort``/``members``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_xfl.crypto import pki
from secure_xfl.crypto.codec import layout_of
from secure_xfl.crypto.cohort import CohortMask, verify_cohort
from secure_xfl.crypto.context import get_preset, load_context, public_context_bytes
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.errors import DecryptionRefused, MaskError
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.lanes import new_context
from secure_xfl.crypto.masking import MaskKeyPair
from secure_xfl.crypto.packing import QuantSpec
from secure_xfl.errors import ConfigError, SecureXFLError
from secure_xfl.protocol import messages
from secure_xfl.protocol.client import (
    Action,
    Call,
    ClientRound,
    Decline,
    Done,
    PublishKey,
    SealAndUpload,
    Train,
    Trained,
)
from secure_xfl.protocol.coordinator import Coordinator, CoordinatorSettings
from secure_xfl.protocol.events import Finished, Offer, Wait
from secure_xfl.protocol.plan import ClientPolicy
from secure_xfl.protocol.rules import make_rule
from secure_xfl.protocol.seal import seal_upload
from tests.conftest import contexts

FED = "fed"
NAMES = ("a", "b", "c")
CA_CERT, CA_KEY = pki.create_ca(FED)
IDS = {n: pki.issue_certificate(CA_CERT, CA_KEY, pki.PeerIdentity(FED, "client", n)) for n in NAMES}
CERTS = {n: c for n, (c, _) in IDS.items()}
NUMEL = 3000
DP = DPSpec(clip_norm=1.0, noise_multiplier=0.5, min_clients=2)
PACKED = get_preset("xfl-packed")
_CTX: dict[str, tuple[Any, Any]] = {}


def lane_contexts(name: str) -> tuple[Any, Any]:
    """(secret, public) contexts of a packed preset (BFV: t fixed by the run's quant)."""
    if name not in _CTX:
        quant = QuantSpec.for_dp(DP, max_clients=8)
        secret = new_context(get_preset(name), quant)
        _CTX[name] = (secret, load_context(public_context_bytes(secret), require_secret=False))
    return _CTX[name]


@dataclass
class Sim:
    core: Coordinator
    kh: KeyHolder
    clients: dict[str, ClientRound]
    preset: Any = PACKED
    now: float = 0.0
    dead: set[str] = field(default_factory=set)  # never answer after publishing a key
    tamper: Any = None  # rewrites a relayed cohort (a lying aggregator)
    queues: dict[str, deque[Action]] = field(default_factory=dict)
    pairs: dict[str, MaskKeyPair] = field(default_factory=dict)
    trainings: list[str] = field(default_factory=list)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    done: dict[str, Done] = field(default_factory=dict)
    released: list[Any] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def call(self, name: str, act: Call) -> list[Action]:
        m, core, f = self.clients[name], self.core, act.fields
        if act.method == "hello":
            return m.on_reply("welcome", core.hello(name), self.now)
        if act.method == "decline":
            return m.on_reply("ack", {}, self.now)
        if act.method == "cohort":
            try:
                members = core.members(name, f["round"], f["epoch"])
            except SecureXFLError as exc:
                return m.on_error(exc.code, str(exc), self.now)
            if members is None:
                return m.on_reply("wait", {"retry_s": 0.2}, self.now)
            if self.tamper is not None:
                members = self.tamper(name, members)
            return m.on_reply("members", {"members": members}, self.now)
        out = core.task(name, f["after"], self.now, f["attempt"])
        if isinstance(out, Finished):
            return m.on_reply("done", {"ok": out.ok, "reason": out.reason}, self.now)
        if isinstance(out, Wait):
            return m.on_reply("wait", {"retry_s": out.retry_s}, self.now)
        assert isinstance(out, Offer)
        wire = {"plan": out.plan.to_wire(), "model": messages.pack_tensors(out.model),
                "hints": out.hints, "epoch": out.epoch}  # fmt: skip
        return m.on_reply("round", wire, self.now)

    def perform(self, name: str, act: Action) -> list[Action]:
        m = self.clients[name]
        if isinstance(act, Call):
            return self.call(name, act)
        if isinstance(act, Train):
            self.trainings.append(f"{name}@{act.plan.round}")
            self.vectors[name] = np.full(NUMEL, 0.01 * (1 + NAMES.index(name)))
            return m.trained(Trained(num_samples=10, loss=1.0, throughput=None))
        if isinstance(act, PublishKey):
            pair = self.pairs[name] = MaskKeyPair.generate()
            key = pair.sign(run="r", round=act.round, attempt=act.epoch, client=name,
                            signing_key=IDS[name][1])  # fmt: skip
            self.core.mask_key(name, act.round, act.epoch, key.to_wire())
            if name in self.dead:
                return []  # dies right after publishing: the cohort is fixed with it
            return m.on_reply("ack", {}, self.now)
        if isinstance(act, SealAndUpload):
            try:
                keys = verify_cohort(act.members, ca=CA_CERT, crl=None, federation=FED, run="r",
                                     round=act.round, epoch=act.epoch, own_name=name,
                                     own=self.pairs[name], min_size=2)  # fmt: skip
            except MaskError as exc:
                self.log.append(f"{name} refuses the cohort: {exc.reason}")
                return m.refuse_cohort(exc.reason, str(exc))
            mask = CohortMask("r", act.round, act.epoch or 0, name, self.pairs[name], keys)
            _, public = lane_contexts(self.preset.name)
            layout = layout_of({"w": torch.zeros(NUMEL)})
            blob = seal_upload(act, self.vectors[name], layout, ctx=public, preset=self.preset,
                               client=name, signing_key=IDS[name][1], mask=mask)  # fmt: skip
            try:
                self.core.upload(name, act.round, blob)
            except SecureXFLError as exc:
                return m.on_error(exc.code, str(exc), self.now)
            self.log.append(f"{name} uploaded {act.round} epoch {act.epoch}")
            return m.on_reply("ack", {}, self.now)
        if isinstance(act, Decline):
            self.log.append(f"{name} declines {act.round}: {act.reason}")
            self.core.decline(name, act.round, act.reason, act.detail, self.now)
            return m.on_reply("ack", {}, self.now)
        assert isinstance(act, Done)
        self.done[name] = act
        return []

    def run(self, until: float = 2000.0, dt: float = 0.5) -> None:
        for n, m in self.clients.items():
            self.queues[n] = deque(m.start(self.now))
        while self.now < until and len(self.done) < len(self.clients) - len(self.dead):
            for n, q in self.queues.items():
                if n in self.done:
                    continue
                while q:
                    q.extend(self.perform(n, q.popleft()))
                if n not in self.dead:
                    q.extend(self.clients[n].handle_timer(self.now))
            req = self.core.handle_timer(self.now)
            if req is not None:
                try:
                    out = self.kh.decrypt(req.aggregate)
                except DecryptionRefused as exc:
                    self.core.decrypt_failed(req.round, exc, self.now)
                else:
                    self.released.append(out)
                    self.core.decrypted(req.round, out.vector, {}, self.now)
            self.now += dt


def make_sim(
    tmp: Path, *, rounds: int = 1, mask_timeout: float = 20.0, preset: str = "xfl-packed"
) -> Sim:
    secret, public = lane_contexts(preset)
    packed = get_preset(preset)
    settings = CoordinatorSettings(
        run="r", rounds=rounds, min_clients=2, timeout_s=30.0, dp=DP, weighting="client",
        weight_cap=10.0, give_up_after_s=600.0, masking=True, mask_timeout_s=mask_timeout,
    )  # fmt: skip
    core = Coordinator(settings, ctx=public, preset=packed, enrolled=lambda: CERTS,
                       model={"w": np.zeros(NUMEL, dtype=np.float32)}, rule=make_rule("fedavg"),
                       now=0.0)  # fmt: skip
    kh = KeyHolder(ctx=secret, preset=packed, client_keys=CERTS, state_dir=tmp,
                   policy=KeyHolderPolicy(run="r", min_clients=2, dp=DP, masking=True))  # fmt: skip
    policy = ClientPolicy(run="r", dp=DP, min_clients=2, masking=True)
    return Sim(core=core, kh=kh, clients={n: ClientRound(n, policy) for n in NAMES}, preset=packed)


def expected_mean(names: list[str]) -> float:
    return float(np.mean([0.01 * (1 + NAMES.index(n)) for n in names]))


@pytest.mark.parametrize("preset", ["xfl-packed", "bfv-lanes"])
def test_a_masked_run_releases_only_whole_cohorts(tmp_path: Path, preset: str) -> None:
    s = make_sim(tmp_path, rounds=2, preset=preset)
    assert s.core.plan.masked and s.core.plan.quant is not None
    s.run()
    assert s.core.ok, s.core.outcome
    assert [r.release.participants for r in s.released] == [NAMES, NAMES]
    for out in s.released:
        claims = {st.statement.mask for st in out.release.statements}
        assert len(claims) == 1 and next(iter(claims)).clients == NAMES
    # DP noise (σC/√K per client) and stochastic rounding are the only error.
    assert abs(float(np.mean(s.released[0].vector)) - expected_mean(list(NAMES))) < 0.05
    assert sorted(s.trainings) == ["a@0", "a@1", "b@0", "b@1", "c@0", "c@1"]


@pytest.mark.parametrize("preset", ["xfl-packed", "bfv-lanes"])
def test_a_dropout_after_the_cohort_is_fixed_re_masks_without_retraining(
    tmp_path: Path, preset: str
) -> None:
    s = make_sim(tmp_path, mask_timeout=10.0, preset=preset)
    s.dead = {"c"}
    s.run()
    assert s.core.ok, s.core.outcome
    (out,) = s.released
    assert out.release.participants == ("a", "b")
    (claim,) = {st.statement.mask for st in out.release.statements}
    assert claim is not None and claim.epoch == 1 and claim.clients == ("a", "b")
    assert "a uploaded 0 epoch 0" in s.log and "a uploaded 0 epoch 1" in s.log
    assert sorted(s.trainings) == ["a@0", "b@0", "c@0"]  # re-masked, not retrained
    assert abs(float(np.mean(out.vector)) - expected_mean(["a", "b"])) < 0.05


def test_a_substituted_key_in_the_relayed_cohort_is_refused(tmp_path: Path) -> None:
    s = make_sim(tmp_path)
    intruder = pki.issue_certificate(CA_CERT, CA_KEY, pki.PeerIdentity(FED, "client", "evil"))

    def swap_b(name: str, members: list[list[Any]]) -> list[list[Any]]:
        # The aggregator swaps b's key for one it holds, signed with another client's key.
        out = []
        for wire, pem in members:
            if wire[5] == "b":
                fake = MaskKeyPair.generate().sign(run="r", round=wire[3], attempt=wire[4],
                                                   client="b", signing_key=intruder[1])  # fmt: skip
                wire = fake.to_wire()
            out.append([wire, pem])
        return out

    s.tamper = swap_b
    s.run(until=100.0)
    assert "a refuses the cohort: bad_signature" in s.log
    assert "b refuses the cohort: bad_signature" in s.log  # its own key was replaced too
    assert not s.released and not s.core.ok and "refused the plan" in s.core.outcome


def test_the_coordinator_refuses_keys_and_uploads_outside_the_cohort(tmp_path: Path) -> None:
    s = make_sim(tmp_path)
    core = s.core
    for n in NAMES:
        assert isinstance(core.task(n, -1, 0.0, 0), Offer)
    pair = MaskKeyPair.generate()
    theirs = pair.sign(run="r", round=0, attempt=0, client="a", signing_key=IDS["a"][1])
    with pytest.raises(MaskError) as err:
        core.mask_key("b", 0, 0, theirs.to_wire())  # b relays a's key as its own
    assert err.value.reason == "wrong_client"
    forged = pair.sign(run="r", round=0, attempt=0, client="b", signing_key=IDS["a"][1])
    with pytest.raises(MaskError) as err:
        core.mask_key("b", 0, 0, forged.to_wire())
    assert err.value.reason == "bad_signature"
    with pytest.raises(SecureXFLError, match="epoch"):
        core.mask_key("a", 0, 5, theirs.to_wire())
    assert core.members("a", 0, 0) is None  # not fixed yet: wait


def test_masked_rounds_refuse_a_buffered_rule() -> None:
    _, public = contexts("xfl-packed")
    settings = CoordinatorSettings(run="r", rounds=1, min_clients=2, timeout_s=5.0, dp=DP,
                                   weighting="client", masking=True)  # fmt: skip
    with pytest.raises(ConfigError, match="synchronous"):
        Coordinator(settings, ctx=public, preset=PACKED, enrolled=lambda: CERTS,
                    model={"w": np.zeros(8, dtype=np.float32)}, rule=make_rule("async"),
                    now=0.0)  # fmt: skip


def test_a_client_whose_kit_demands_masks_refuses_an_unmasked_packed_plan(tmp_path: Path) -> None:
    s = make_sim(tmp_path)
    plan = s.core.plan
    from dataclasses import replace

    from secure_xfl.protocol.plan import PlanRefused

    with pytest.raises(PlanRefused, match="pairwise masks"):
        ClientPolicy(run="r", dp=DP, min_clients=2, masking=True).check(replace(plan, masked=False))
