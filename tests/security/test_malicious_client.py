"""One malicious enrolled client breaks no promise (DESIGN §2), against real processes.

Mallory holds a genuine certificate and kit and talks real mTLS QUIC to the real
aggregator. She signs an absurd weight (refused by the aggregator before any
ciphertext is touched), then an update of norm 500·C that she signs as clipped and
noised under the round's plan. The aggregator cannot see the norm; the key holder
decrypts the aggregate, finds it beyond the release bound of what its clients
signed, charges and records the refusal, and releases nothing. The round is not
burnt: it is re-opened, the honest client processes retrain with fresh noise, and
the run completes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from secure_xfl.crypto import pem, pki
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.envelope import ProtectedUpdate, SignedStatement
from secure_xfl.crypto.protect import seal_vector
from secure_xfl.kit import Kit
from secure_xfl.privacy.ledger import read_ledger
from secure_xfl.protocol import messages
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.services.client import client_policy
from secure_xfl.services.keyholder import LEDGER_FILE
from tests.federation import federation
from tests.security import live

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

NUMEL = 2000
SIGMA, CLIP, K = 1.0, 1.0, 3


def test_absurd_weight_and_unclipped_update_are_contained(tmp_path: Path) -> None:
    root = live.provision_run(
        tmp_path,
        (*live.HONEST, "mallory"),
        rounds=1,
        min_clients=K,
        timeout_s=15.0,
        privacy={"noise_multiplier": SIGMA, "clip_norm": CLIP},
    )
    mallory = Kit.load(root / "client-mallory")
    preset = get_preset(mallory.config.federation.preset)
    model = live.zero_model(NUMEL)

    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")

        async def attack() -> dict[str, str]:
            seen: dict[str, str] = {}
            async with live.connect(mallory, "aggregator", port) as m:
                out = await live.call(m, messages.encode("task", after=-1))
                plan = RoundPlan.from_wire(messages.decode(out.body)["plan"])
                honest = ProtectedUpdate.decode(live.honest_update(root, "mallory", 0, model, plan))
                st = dataclasses.replace(honest.statement, weight=1e12)
                heavy = ProtectedUpdate(
                    SignedStatement(st, pki.sign(mallory.tls.private_key, st.signing_bytes())),
                    honest.chunks,
                )
                upload = messages.encode("upload", round=0, update=heavy.encode())
                seen["weight_1e12"] = (await live.call(m, upload)).code
                unclipped = seal_vector(
                    np.full(NUMEL, 500.0 * CLIP / np.sqrt(NUMEL)),
                    ctx=mallory.public_context(),
                    preset=preset,
                    layout=live.layout_for(model),
                    run=plan.run,
                    round=0,
                    client="mallory",
                    signing_key=mallory.tls.private_key,
                    dp=client_policy(mallory).dp,  # claims clip and noise it did not apply
                    weight=0.5,
                    weighting="client",
                    plan_digest=plan.digest,
                    base_model_digest=plan.model_digest,
                )
                upload = messages.encode("upload", round=0, update=unclipped.encode())
                seen["unclipped"] = (await live.call(m, upload)).code
                for c in live.HONEST:
                    fed.start_client(c)
                await live.hear_done(m, after=0)
                return seen

        seen = live.run(asyncio.wait_for(attack(), 300))
        assert fed.wait("aggregator", timeout=120) == 0, fed.logs()
        for c in live.HONEST:
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
        agg_log, kh_log = fed.procs["aggregator"].text(), fed.procs["keyholder"].text()

    assert seen == {"weight_1e12": "weight_out_of_bounds", "unclipped": "ok"}, seen
    assert "aggregate_out_of_bounds" in kh_log and "re-opening it" in agg_log
    kh = root / "keyholder"
    entries = read_ledger(kh / "state" / LEDGER_FILE, pem.load_certificate(kh / "cert.pem"))
    assert [(e["round"], e.get("outcome")) for e in entries] == [(0, "refused"), (0, "released")]
    assert entries[0]["reason"] == "aggregate_out_of_bounds"
    assert "mallory" in entries[0]["participants"]  # charged: the key holder saw it
    assert entries[1]["participants"] == sorted(live.HONEST)
    assert entries[1]["epsilon"] > entries[0]["epsilon"]  # both decryptions are charged
    released = np.load(root / "agg-out" / "global-1.npy", allow_pickle=False)
    # The honest average's norm is ≈ its noise, √d·σC/Σw ≈ 27; mallory's update alone
    # would have added ≈ 500/Σw ≈ 240.
    assert float(np.linalg.norm(released)) < 60
    print(f"\nmalicious client: {seen}; ledger outcomes {[e['outcome'] for e in entries]}")


@pytest.mark.parametrize("masked", [True, False])
def test_a_lane_invalid_packed_update_does_not_burn_the_round(tmp_path: Path, masked: bool) -> None:
    """Packed preset: mallory uploads a correctly signed update whose slots are not a
    valid lane packing (half-integers); with masks on (the default) it even takes part
    in the cohort (its key published, the cohort's claim signed) but adds no mask. The
    key holder's lane check fails after decryption: the refusal is recorded and charged,
    nothing is released, the round is re-opened and the honest retry released (masked:
    the retry's cohort is fixed at the deadline without mallory); the run ends well."""
    from secure_xfl.crypto.codec import encrypt_slots
    from secure_xfl.crypto.cohort import MaskClaim
    from secure_xfl.crypto.envelope import UpdateStatement, ciphertext_digest
    from secure_xfl.crypto.masking import MaskKeyPair, SignedMaskKey, cohort_digest

    root = live.provision_run(
        tmp_path,
        (*live.HONEST, "mallory"),
        rounds=1,
        min_clients=K,
        timeout_s=15.0,
        federation={"preset": "xfl-packed"},
        privacy={"noise_multiplier": SIGMA, "clip_norm": CLIP, "masking": masked},
    )
    mallory = Kit.load(root / "client-mallory")
    preset = get_preset("xfl-packed")
    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")

        async def attack() -> str:
            async with live.connect(mallory, "aggregator", port) as m:
                out = await live.call(m, messages.encode("task", after=-1))
                offer = messages.decode(out.body)
                plan = RoundPlan.from_wire(offer["plan"])
                quant = plan.quant
                assert quant is not None and plan.masked is masked
                claim = None
                if masked:  # take part in the cohort like an honest client, then cheat
                    epoch = offer["epoch"]
                    key = MaskKeyPair.generate().sign(
                        run=plan.run, round=0, attempt=epoch, client="mallory",
                        signing_key=mallory.tls.private_key,
                    )  # fmt: skip
                    ack = await live.call(m, messages.encode("mask_key", round=0, epoch=epoch,
                                                             key=key.to_wire()))  # fmt: skip
                    assert ack.code == "ok", ack
                    for c in live.HONEST:
                        fed.start_client(c)
                    while True:
                        got = messages.decode((await live.call(
                            m, messages.encode("cohort", round=0, epoch=epoch))).body)  # fmt: skip
                        if got["t"] == "members":
                            break
                        await asyncio.sleep(0.1)
                    keys = [SignedMaskKey.from_wire(e[0]) for e in got["members"]]
                    names = tuple(sorted(k.client for k in keys))
                    claim = MaskClaim(epoch, names, cohort_digest(keys))
                n_slots = quant.chunk_slots(NUMEL, preset.slots)
                chunks = encrypt_slots(
                    mallory.public_context(),
                    [np.full(k, 0.5) for k in n_slots],  # no integer: not a lane packing
                    scale=2.0**quant.scale_bits,
                )
                st = UpdateStatement(
                    run=plan.run, round=0, client="mallory", layout_digest=plan.layout_digest,
                    preset=preset.name, numel=NUMEL, weight=0.5, weighting="client",
                    ciphertext_digest=ciphertext_digest(chunks), loss=None, quant=quant,
                    plan_digest=plan.digest, base_round=0, base_model_digest=plan.model_digest,
                    dp=client_policy(mallory).dp, mask=claim,
                )  # fmt: skip
                sig = pki.sign(mallory.tls.private_key, st.signing_bytes())
                blob = ProtectedUpdate(SignedStatement(st, sig), tuple(chunks)).encode()
                code = (await live.call(m, messages.encode("upload", round=0, update=blob))).code
                if not masked:
                    for c in live.HONEST:
                        fed.start_client(c)
                await live.hear_done(m, after=0)
                return code

        code = live.run(asyncio.wait_for(attack(), 300))
        assert fed.wait("aggregator", timeout=120) == 0, fed.logs()
        kh_log = fed.procs["keyholder"].text()
    assert code == "ok"  # the aggregator cannot see inside a ciphertext
    assert "aggregate_invalid" in kh_log
    kh = root / "keyholder"
    entries = read_ledger(kh / "state" / LEDGER_FILE, pem.load_certificate(kh / "cert.pem"))
    assert [(e.get("outcome"), e.get("reason")) for e in entries] == [
        ("refused", "aggregate_invalid"),
        ("released", None),
    ]
    assert entries[1]["participants"] == sorted(live.HONEST)
