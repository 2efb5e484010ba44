"""Record-level DP per silo: the signed spec, the silo's own account, the key holder's floor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.config import ConfigError, parse_config
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.errors import DecryptionRefused, EnvelopeError
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy
from secure_xfl.crypto.recordspec import RecordDPFloor, RecordDPSpec
from secure_xfl.privacy.accountant import epsilon
from secure_xfl.privacy.record import RecordAccount
from secure_xfl.privacy.silo import RecordBudgetExhausted, SiloAccount, SiloStateError
from tests.conftest import contexts
from tests.unit.helpers import RUN, make_accumulator, make_update

DELTA = 1e-5
Q = 64 / 4677
FLOOR = RecordDPFloor(max_grad_norm=1.0, noise_multiplier=0.0, delta=DELTA)
SPEC = RecordDPSpec(max_grad_norm=1.0, noise_multiplier=0.9, sample_rate=Q, steps=20, delta=DELTA)


# ------------------------------------------------------------------ the signed spec


def test_spec_round_trips_and_malformed_wire_is_typed() -> None:
    assert RecordDPSpec.from_wire(SPEC.to_wire()) == SPEC
    assert RecordDPFloor.from_wire(FLOOR.to_wire()) == FLOOR
    bad = [
        SPEC.to_wire()[:6],
        ["dp-sgd-other", *SPEC.to_wire()[1:]],
        ["dp-sgd-poisson", "user", *SPEC.to_wire()[2:]],  # user-level units are not built
        [*SPEC.to_wire()[:4], 1.5, *SPEC.to_wire()[5:]],  # q > 1
        [*SPEC.to_wire()[:4], 0.0, *SPEC.to_wire()[5:]],  # q = 0 would claim ε = 0
        [*SPEC.to_wire()[:5], -1, SPEC.delta],
        [*SPEC.to_wire()[:5], True, SPEC.delta],
        [*SPEC.to_wire()[:3], float("nan"), *SPEC.to_wire()[4:]],
        [*SPEC.to_wire()[:6], 1.0],
        "not a list",
    ]
    for obj in bad:
        with pytest.raises(EnvelopeError):
            RecordDPSpec.from_wire(obj)


def test_weaker_than_names_every_weaker_axis() -> None:
    floor = RecordDPFloor(max_grad_norm=0.5, noise_multiplier=1.0, delta=DELTA)
    assert SPEC.weaker_than(FLOOR) == []
    why = SPEC.weaker_than(floor)
    assert len(why) == 2 and "clip" in why[0] and "σ" in why[1]
    assert dataclasses.replace(SPEC, delta=1e-6).weaker_than(FLOOR) == ["record δ 1e-06 != 1e-05"]


def test_tighten_takes_the_stricter_of_plan_and_kit() -> None:
    plan = RecordDPFloor(max_grad_norm=2.0, noise_multiplier=0.3, delta=1e-3)
    kit = RecordDPFloor(max_grad_norm=1.0, noise_multiplier=0.0, delta=DELTA)
    got = kit.tighten(plan)
    assert (got.max_grad_norm, got.noise_multiplier, got.delta) == (1.0, 0.3, DELTA)
    assert kit.tighten(None) == kit


# ------------------------------------------------------------------ config


def test_no_dp_at_all_needs_an_explicit_allow() -> None:
    off = {"privacy": {"record": {"enabled": False}}}
    with pytest.raises(ConfigError, match="allow_no_dp"):
        parse_config(off)
    cfg = parse_config({"privacy": {"record": {"enabled": False}, "allow_no_dp": True}})
    assert not cfg.has_dp and cfg.record_floor() is None
    default = parse_config({})
    assert default.has_dp and default.record_floor() == FLOOR
    assert default.privacy.record.budget == default.privacy.record.target_epsilon
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"privacy": {"record": {"sigma": 1.0}}})
    with pytest.raises(ConfigError):
        parse_config({"privacy": {"record": {"target_epsilon": 0.0}}})


# ------------------------------------------------------------------ the silo's account


def _silo(tmp: Path, **kw: float) -> SiloAccount:
    opts = {"delta": DELTA, "target": 2.0, "budget": 2.0, "rounds": 5, **kw}
    return SiloAccount.load(tmp / "state" / "record-dp.json", **opts)  # type: ignore[arg-type]


def test_silo_derives_sigma_for_its_target_and_ends_within_it(tmp_path: Path) -> None:
    silo = _silo(tmp_path)
    sigmas = []
    for r in range(5):
        spec = silo.plan(FLOOR, run="r", round=r, sample_rate=Q, steps=20)
        silo.commit(spec, run="r", round=r, attempt=0)
        sigmas.append(spec.noise_multiplier)
    assert silo.spent() <= 2.0
    assert silo.spent() > 1.9  # the derivation is tight, not a huge σ
    # The same σ every round when nothing unplanned happens.
    assert max(sigmas) - min(sigmas) < 1e-3
    # Exactly the accountant's figure for what was run.
    assert silo.spent() == pytest.approx(epsilon(silo.history(), DELTA, "pld"))


def test_silo_state_survives_a_restart_and_a_sixth_round_is_declined(tmp_path: Path) -> None:
    silo = _silo(tmp_path)
    for r in range(5):
        silo.commit(silo.plan(FLOOR, run="r", round=r, sample_rate=Q, steps=20),
                    run="r", round=r, attempt=0)  # fmt: skip
    again = _silo(tmp_path)
    assert again.history() == silo.history()
    with pytest.raises(RecordBudgetExhausted) as info:
        again.plan(FLOOR, run="r", round=5, sample_rate=Q, steps=20)
    assert info.value.reason == "record_budget_exhausted"
    # A fixed-σ kit past its budget is declined by the budget check itself.
    fixed = _silo(tmp_path, target=0.0, budget=2.0)
    strong = RecordDPFloor(max_grad_norm=1.0, noise_multiplier=0.5, delta=DELTA)
    with pytest.raises(RecordBudgetExhausted, match="would reach"):
        fixed.plan(strong, run="r2", round=0, sample_rate=Q, steps=20)


def test_a_retried_round_raises_sigma_for_the_rest(tmp_path: Path) -> None:
    silo = _silo(tmp_path)
    first = silo.plan(FLOOR, run="r", round=0, sample_rate=Q, steps=20)
    silo.commit(first, run="r", round=0, attempt=0)
    retry = silo.plan(FLOOR, run="r", round=0, sample_rate=Q, steps=20)
    assert retry.noise_multiplier > first.noise_multiplier
    silo.commit(retry, run="r", round=0, attempt=1)
    for r in range(1, 5):
        silo.commit(silo.plan(FLOOR, run="r", round=r, sample_rate=Q, steps=20),
                    run="r", round=r, attempt=0)  # fmt: skip
    assert silo.spent() <= 2.0


def test_plan_floor_above_the_derived_sigma_wins(tmp_path: Path) -> None:
    strong = RecordDPFloor(max_grad_norm=0.5, noise_multiplier=3.0, delta=DELTA)
    spec = _silo(tmp_path).plan(strong, run="r", round=0, sample_rate=Q, steps=20)
    assert (spec.noise_multiplier, spec.max_grad_norm) == (3.0, 0.5)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 2, "entries": []}', b'{"version": 1, "entries": [{"run": 1}]}',
     json.dumps({"version": 1, "entries": [{"run": "r", "round": 0, "attempt": 0, "sigma": -1,
                 "q": 0.1, "steps": 1, "clip": 1.0}]}).encode()],
)  # fmt: skip
def test_an_unreadable_state_is_an_error_not_a_fresh_start(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state" / "record-dp.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(SiloStateError):
        _silo(tmp_path)


def test_commit_writes_atomically_with_private_mode(tmp_path: Path) -> None:
    silo = _silo(tmp_path)
    silo.commit(SPEC, run="r", round=0, attempt=0)
    path = tmp_path / "state" / "record-dp.json"
    assert path.stat().st_mode & 0o077 == 0
    assert [p.name for p in path.parent.iterdir()] == ["record-dp.json"]  # no temp left


# ------------------------------------------------------------------ key holder and ledger


KEYS = {f"c{i}": ec.generate_private_key(ec.SECP256R1()) for i in range(3)}


def _aggregate(record: RecordDPSpec | None) -> bytes:
    acc = make_accumulator(KEYS, 8)
    for i in range(3):
        acc.add(make_update(KEYS[f"c{i}"], f"c{i}", np.ones(8) * 0.1, record=record))
    return acc.result().encode()


def _holder(tmp: Path, **policy: object) -> KeyHolder:
    secret, _ = contexts()
    return KeyHolder(
        ctx=secret, preset=get_preset("xfl-default"),
        policy=KeyHolderPolicy(run=RUN, min_clients=3, **policy),  # type: ignore[arg-type]
        client_keys={c: k.public_key() for c, k in KEYS.items()}, state_dir=tmp,
    )  # fmt: skip


def test_keyholder_refuses_entries_weaker_than_its_record_floor(tmp_path: Path) -> None:
    strict = RecordDPFloor(max_grad_norm=1.0, noise_multiplier=1.0, delta=DELTA)
    for record in (None, SPEC):  # none signed / σ_r 0.9 < 1.0
        with pytest.raises(DecryptionRefused) as info:
            _holder(tmp_path / str(record is None), record=strict).decrypt(_aggregate(record))
        assert info.value.reason == "record_dp_weaker_than_policy"
    out = _holder(tmp_path / "ok", record=FLOOR).decrypt(_aggregate(SPEC))
    assert [s.statement.record for s in out.release.statements] == [SPEC] * 3


def test_keyholder_without_allow_no_dp_refuses_a_noiseless_aggregate(tmp_path: Path) -> None:
    with pytest.raises(DecryptionRefused) as info:
        _holder(tmp_path / "a", allow_no_dp=False).decrypt(_aggregate(None))
    assert info.value.reason == "no_privacy"
    # Record-level noise from every entry is privacy enough.
    _holder(tmp_path / "b", allow_no_dp=False).decrypt(_aggregate(SPEC))
    silent = dataclasses.replace(SPEC, noise_multiplier=0.0)
    with pytest.raises(DecryptionRefused):
        _holder(tmp_path / "c", allow_no_dp=False).decrypt(_aggregate(silent))


def test_record_account_budget_and_projection() -> None:
    acct = RecordAccount(DELTA)
    for _ in range(5):
        acct.step("a", SPEC)
    eps = acct.epsilon("a")
    assert eps == pytest.approx(epsilon([SPEC.history] * 5, DELTA, "pld"))
    assert acct.epsilon("a", "rdp") > eps  # PLD is the tighter accountant here
    after = acct.projected({"a": SPEC, "b": SPEC})
    assert after["a"] > eps and after["b"] < eps
    assert acct.over_budget(after["a"] * 1.01, {"a": SPEC}) is None
    why = acct.over_budget(eps, {"a": SPEC})
    assert why is not None and "silo a" in why
    assert acct.over_budget(0.0, {"a": SPEC}) is None  # 0 = no budget
