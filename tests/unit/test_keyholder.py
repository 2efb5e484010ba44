"""Each key-holder refusal, and once-only decryption surviving a restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from secure_xfl.crypto import pki
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import EncryptedAggregate, SignedStatement
from secure_xfl.crypto.errors import DecryptionRefused
from secure_xfl.crypto.keyholder import KeyHolder, KeyHolderPolicy, Release
from secure_xfl.privacy.dp import effective_noise_multiplier as effective_noise
from tests.conftest import contexts
from tests.unit.helpers import RUN, layout_for, make_accumulator, make_update

KEYS = {f"c{i}": ec.generate_private_key(ec.SECP256R1()) for i in range(4)}


def aggregate(n: int = 3, round: int = 0) -> EncryptedAggregate:
    acc = make_accumulator(KEYS, 10, round=round)
    for i in range(n):
        acc.add(make_update(KEYS[f"c{i}"], f"c{i}", np.ones(10) * i, round=round))
    return acc.result()


AGG = aggregate()


def holder(tmp: Path, **policy: object) -> KeyHolder:
    secret, _ = contexts()
    pol = KeyHolderPolicy(**{"run": RUN, "min_clients": 3, **policy})  # type: ignore[arg-type]
    return KeyHolder(
        ctx=secret,
        preset=get_preset("xfl-default"),
        policy=pol,
        client_keys={c: k.public_key() for c, k in KEYS.items()},
        state_dir=tmp,
    )


def refused(kh: KeyHolder, agg: EncryptedAggregate) -> str:
    with pytest.raises(DecryptionRefused) as info:
        kh.decrypt(agg.encode())
    return info.value.reason


def test_decrypts_a_valid_aggregate(tmp_path: Path) -> None:
    out = holder(tmp_path).decrypt(AGG)
    assert np.allclose(out.vector, 1.0, atol=1e-3)


def test_refuses_fewer_than_min_clients(tmp_path: Path) -> None:
    assert refused(holder(tmp_path), aggregate(2)) == "too_few_clients"


def test_refuses_duplicate_clients_in_manifest(tmp_path: Path) -> None:
    agg = aggregate(2)
    dup = dataclasses.replace(agg, manifest=(*agg.manifest, agg.manifest[0]))
    assert refused(holder(tmp_path), dup) == "duplicate_client"


def test_refuses_forged_signature(tmp_path: Path) -> None:
    forged = SignedStatement(AGG.manifest[0].statement, AGG.manifest[1].signature)
    agg = dataclasses.replace(AGG, manifest=(forged, *AGG.manifest[1:]))
    assert refused(holder(tmp_path), agg) == "bad_signature"


def test_refuses_statement_re_signed_by_a_stranger(tmp_path: Path) -> None:
    from secure_xfl.crypto import pki

    st = AGG.manifest[0].statement
    stranger = ec.generate_private_key(ec.SECP256R1())
    forged = SignedStatement(st, pki.sign(stranger, st.signing_bytes()))
    agg = dataclasses.replace(AGG, manifest=(forged, *AGG.manifest[1:]))
    assert refused(holder(tmp_path), agg) == "bad_signature"


def test_refuses_tampered_ciphertext_digest(tmp_path: Path) -> None:
    st = dataclasses.replace(AGG.manifest[0].statement, ciphertext_digest=b"\x00" * 32)
    agg = dataclasses.replace(
        AGG, manifest=(SignedStatement(st, AGG.manifest[0].signature), *AGG.manifest[1:])
    )
    assert refused(holder(tmp_path), agg) == "bad_signature"


def test_refuses_inflated_weight(tmp_path: Path) -> None:
    st = dataclasses.replace(AGG.manifest[0].statement, weight=1000.0)
    agg = dataclasses.replace(
        AGG, manifest=(SignedStatement(st, AGG.manifest[0].signature), *AGG.manifest[1:])
    )
    assert refused(holder(tmp_path), agg) == "bad_signature"


def test_refuses_unknown_client(tmp_path: Path) -> None:
    secret, _ = contexts()
    kh = KeyHolder(
        ctx=secret,
        preset=get_preset("xfl-default"),
        policy=KeyHolderPolicy(run=RUN, min_clients=3),
        client_keys={c: KEYS[c].public_key() for c in ("c0", "c1")},
        state_dir=tmp_path,
    )
    assert refused(kh, AGG) == "unknown_client"


def test_refuses_wrong_run(tmp_path: Path) -> None:
    assert refused(holder(tmp_path, run="other-run"), AGG) == "wrong_run"


def test_refuses_manifest_from_another_round(tmp_path: Path) -> None:
    agg = dataclasses.replace(aggregate(3, round=1), round=2)
    assert refused(holder(tmp_path), agg) == "manifest_mismatch"


def test_decrypts_each_round_once_even_after_restart(tmp_path: Path) -> None:
    kh = holder(tmp_path)
    kh.decrypt(AGG)
    other = aggregate()  # the same values encrypted again: another aggregate
    assert refused(kh, other) == "already_decrypted"
    kh.close()
    restarted = holder(tmp_path)
    assert refused(restarted, other) == "already_decrypted"
    assert restarted.decrypt(AGG).repeat  # the very aggregate released: the same answer
    restarted.decrypt(aggregate(3, round=1))


def test_two_key_holders_cannot_share_a_state_dir(tmp_path: Path) -> None:
    first = holder(tmp_path)
    with pytest.raises(DecryptionRefused, match="state_locked"):
        holder(tmp_path)
    first.close()
    holder(tmp_path).close()


def test_corrupt_state_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "decrypted.jsonl").write_text('{"run": "x", "round": 0}\n{"run": ')
    with pytest.raises(DecryptionRefused, match="state_corrupt"):
        holder(tmp_path)


def test_budget_hook_refusal_releases_nothing_and_burns_nothing(tmp_path: Path) -> None:
    calls: list[Release] = []

    def budget(rel: Release) -> None:
        raise DecryptionRefused("budget_exceeded", "test")

    secret, _ = contexts()
    kh = KeyHolder(
        ctx=secret,
        preset=get_preset("xfl-default"),
        policy=KeyHolderPolicy(run=RUN, min_clients=3),
        client_keys={c: k.public_key() for c, k in KEYS.items()},
        state_dir=tmp_path,
        before_release=budget,
        after_release=calls.append,
    )
    assert refused(kh, AGG) == "budget_exceeded"
    assert calls == [] and not kh.already_decrypted(RUN, 0)


def test_effective_noise_and_min_noise_policy(tmp_path: Path) -> None:
    assert effective_noise(1.0, 3, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert effective_noise(1.0, 3, (1.0,) * 12) == pytest.approx(2.0)
    assert effective_noise(1.0, 3, (1.0, 0.1, 0.1)) < 1.0
    kh = holder(tmp_path, dp=DP_SPEC, min_effective_noise=1.5)
    assert refused(kh, noised_aggregate()) == "noise_too_low"


DP_SPEC = DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=3)


def noised_aggregate(
    specs: dict[str, DPSpec | None] | None = None,
    plans: dict[str, bytes] | None = None,
    n: int = 3,
) -> EncryptedAggregate:
    acc = make_accumulator(KEYS, 10)
    for i in range(n):
        c = f"c{i}"
        dp = (specs or {}).get(c, DP_SPEC)
        extra = {"plan_digest": plans[c]} if plans and c in plans else {}
        acc.add(make_update(KEYS[c], c, np.full(10, 0.01 * i), dp=dp, **extra))
    return acc.result()


def test_sigma_eff_comes_from_what_clients_signed(tmp_path: Path) -> None:
    kh = holder(tmp_path, dp=DP_SPEC)
    strong = DPSpec(clip_norm=0.5, noise_multiplier=2.0, min_clients=3)
    rel = kh.check(noised_aggregate({c: strong for c in ("c0", "c1", "c2")}))
    # sensitivity is the signed clip (0.5), noise std 2·0.5/√3 per client, 3 clients
    assert rel.clip_norm == pytest.approx(0.5)
    assert rel.noise_multiplier == pytest.approx(2.0)
    assert [s.statement.dp for s in rel.statements] == [strong] * 3


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (None, "signed no DP"),
        (DPSpec(clip_norm=1.0, noise_multiplier=0.5, min_clients=3), "noise_multiplier"),
        (DPSpec(clip_norm=10.0, noise_multiplier=1.0, min_clients=3), "clip_norm"),
        (DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=2), "min_clients"),
        (DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=3, delta=1e-3), "delta"),
    ],
)
def test_an_entry_weaker_than_the_policy_is_refused(
    tmp_path: Path, spec: DPSpec | None, why: str
) -> None:
    kh = holder(tmp_path, dp=DP_SPEC)
    with pytest.raises(DecryptionRefused, match=why) as info:
        kh.decrypt(noised_aggregate({"c1": spec}).encode())
    assert info.value.reason == "dp_weaker_than_policy"
    assert not kh.already_decrypted(RUN, 0)  # refused before anything was recorded


def test_entries_must_share_one_dp_spec_and_one_plan(tmp_path: Path) -> None:
    kh = holder(tmp_path, dp=DP_SPEC)
    stricter = DPSpec(clip_norm=1.0, noise_multiplier=3.0, min_clients=3)
    assert refused(kh, noised_aggregate({"c2": stricter})) == "manifest_mismatch"
    assert refused(kh, noised_aggregate(plans={"c0": b"\x07" * 32})) == "manifest_mismatch"


def test_cohort_below_the_signed_k_is_refused(tmp_path: Path) -> None:
    kh = holder(
        tmp_path, min_clients=2, dp=DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=2)
    )
    k4 = DPSpec(clip_norm=1.0, noise_multiplier=1.0, min_clients=4)
    assert refused(kh, noised_aggregate({f"c{i}": k4 for i in range(3)})) == "too_few_clients"


def client_weighted(
    vectors: dict[str, np.ndarray], weights: dict[str, float] | None = None
) -> EncryptedAggregate:
    """A client-weighted aggregate whose clients sign DP_SPEC; ``vectors`` are sealed
    as given (a malicious client may skip its own clipping)."""
    from secure_xfl.crypto.protect import seal_vector

    _, public = contexts()
    acc = make_accumulator(KEYS, 10, weighting="client")
    for c, vec in vectors.items():
        w = (weights or {}).get(c, 1.0)
        honest = make_update(KEYS[c], c, vec, weighting="client", weight=w, dp=DP_SPEC)
        if np.linalg.norm(vec) > DP_SPEC.clip_norm:  # seal the raw vector: no clipping
            honest = seal_vector(
                vec,
                ctx=public,
                preset=get_preset("xfl-default"),
                layout=layout_for(10),
                run=RUN,
                round=0,
                client=c,
                signing_key=KEYS[c],
                dp=DP_SPEC,
                weight=w,
                weighting="client",
            )
        acc.add(honest)
    return acc.result()


def test_an_unclipped_update_is_refused_charged_and_the_round_stays_open(tmp_path: Path) -> None:
    refused_calls: list[str] = []
    kh = holder(tmp_path, dp=DP_SPEC, max_attempts=2)
    kh.on_refused = lambda rel, reason: refused_calls.append(reason)
    small = {f"c{i}": np.full(10, 0.01) for i in range(3)}
    bad = client_weighted({**small, "c2": np.full(10, 500.0 / np.sqrt(10))})  # ‖x‖ = 500 C
    assert refused(kh, bad) == "aggregate_out_of_bounds"
    assert refused_calls == ["aggregate_out_of_bounds"] and kh.record.refused(RUN, 0) == 1
    assert not kh.already_decrypted(RUN, 0)  # not burnt: an honest retry is released
    out = kh.decrypt(client_weighted(small).encode())
    assert kh.already_decrypted(RUN, 0) and np.isfinite(out.vector).all()


def test_refused_attempts_are_bounded_and_survive_a_restart(tmp_path: Path) -> None:
    kh = holder(tmp_path, dp=DP_SPEC, max_attempts=1)
    huge = {f"c{i}": np.full(10, 100.0) for i in range(3)}
    assert refused(kh, client_weighted(huge)) == "aggregate_out_of_bounds"
    kh.close()
    again = holder(tmp_path, dp=DP_SPEC, max_attempts=1)
    assert refused(again, client_weighted(huge)) == "too_many_attempts"
    assert again.record.refused(RUN, 0) == 1  # the second was refused before decrypting


def test_key_holder_refuses_weights_outside_its_own_bounds(tmp_path: Path) -> None:
    kh = holder(tmp_path, dp=DP_SPEC)
    agg = client_weighted({f"c{i}": np.full(10, 0.01) for i in range(3)})
    st = agg.manifest[0].statement
    forged = dataclasses.replace(st, weight=1e12)
    entry = SignedStatement(forged, pki.sign(KEYS[st.client], forged.signing_bytes()))
    bad = dataclasses.replace(agg, manifest=(entry, *agg.manifest[1:]))
    assert refused(kh, bad) == "weight_out_of_bounds"
    kh2 = holder(tmp_path / "b", max_weight=5.0)
    heavy = aggregate(3)  # aggregator-weighted, weights 1.0 ≤ 5 pass; now sign 6 > 5
    st = heavy.manifest[0].statement
    forged = dataclasses.replace(st, weight=6.0)
    entry = SignedStatement(forged, pki.sign(KEYS[st.client], forged.signing_bytes()))
    over = dataclasses.replace(heavy, manifest=(entry, *heavy.manifest[1:]), weight_scale=10.0)
    assert refused(kh2, over) == "weight_out_of_bounds"


def test_noise_floor_defaults_to_the_policy_sigma(tmp_path: Path) -> None:
    assert KeyHolderPolicy(run=RUN, min_clients=3, dp=DP_SPEC).noise_floor == 1.0
    kh = holder(tmp_path, dp=DP_SPEC)
    acc = make_accumulator(KEYS, 10, weight_scale=10.0)
    for i, w in enumerate((10.0, 1.0, 1.0)):  # unequal aggregator-side weights lower σ_eff
        acc.add(make_update(KEYS[f"c{i}"], f"c{i}", np.full(10, 0.01), weight=w, dp=DP_SPEC))
    with pytest.raises(DecryptionRefused, match="use client weighting") as info:
        kh.decrypt(acc.result().encode())
    assert info.value.reason == "noise_too_low"
