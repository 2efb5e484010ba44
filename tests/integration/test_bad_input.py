"""Bad input on the wire: each gets a typed error, the aggregator keeps serving, nothing is lost.

A fourth, enrolled client ("mallory") misbehaves through a real mTLS QUIC
connection to a real aggregator process; the three honest client processes then
finish the round and the aggregate must include exactly the accepted updates.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from secure_xfl.crypto.codec import layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.errors import TransportError
from secure_xfl.kit import Kit
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.protocol import messages
from secure_xfl.services.client import client_policy
from secure_xfl.training.trainer import RandomTrainer
from secure_xfl.transport.errors import RemoteError
from secure_xfl.transport.rpc import RpcClient
from tests.federation import federation, provision
from tests.security.live import aggregator_plan

HONEST = ("alpha", "beta", "gamma")
NUMEL = 3000
LIMIT = 1024 * 1024

pytestmark = pytest.mark.timeout(300)


async def misbehave(kit: Kit, port: int, model: dict[str, np.ndarray]) -> dict[str, str]:
    """Send one of each kind of bad input; return the error code each produced."""
    seen: dict[str, str] = {}
    preset = get_preset(kit.config.federation.preset)
    ctx = kit.public_context()
    layout = layout_of({k: torch.from_numpy(v) for k, v in model.items()})
    vec = RandomTrainer.update_for("mallory", 0, model)["weight"].astype(np.float64)

    plan = aggregator_plan(kit, 0, model)

    def signed(run: str, rnd: int, **over: object) -> bytes:
        fields: dict[str, object] = {
            "dp": client_policy(kit).dp,
            "plan_digest": plan.digest,
            "base_model_digest": plan.model_digest,
            **over,
        }
        return protect_vector(
            vec,
            ctx=ctx,
            preset=preset,
            layout=layout,
            run=run,
            round=rnd,
            client="mallory",
            signing_key=kit.tls.private_key,
            weight=RandomTrainer.samples_for("mallory") / 1000.0,
            weighting="client",
            **fields,  # type: ignore[arg-type]
        ).encode()

    async def attempt(label: str, payload: bytes) -> None:
        async with RpcClient(
            tls=kit.tls,
            server_role="aggregator",
            host="127.0.0.1",
            port=port,
            config=kit.config.transport,
        ) as client:
            try:
                await client.call(payload, timeout=60)
                seen[label] = "accepted"
            except RemoteError as exc:
                seen[label] = exc.code
            except TransportError as exc:
                seen[label] = exc.code

    run = kit.config.federation.run
    await attempt("garbage", os.urandom(2000))
    await attempt("unknown_type", msgpack.packb({"t": "steal_key", "v": 1}))
    await attempt("bad_version", msgpack.packb({"t": "hello", "v": 99}))
    await attempt("missing_field", messages.encode("upload", round=0))
    await attempt("oversized", messages.encode("upload", round=0, update=bytes(LIMIT + 10)))
    await attempt("truncated", messages.encode("upload", round=0, update=signed(run, 0))[:-100])
    await attempt("wrong_round", messages.encode("upload", round=7, update=signed(run, 7)))
    await attempt(
        "replay_in_wrong_round", messages.encode("upload", round=0, update=signed(run, 3))
    )
    await attempt("wrong_run", messages.encode("upload", round=0, update=signed("other", 0)))
    tampered = bytearray(signed(run, 0))
    tampered[len(tampered) // 2] ^= 0x55
    await attempt("tampered", messages.encode("upload", round=0, update=bytes(tampered)))
    await attempt(
        "other_plan",
        messages.encode("upload", round=0, update=signed(run, 0, plan_digest=b"p" * 32)),
    )
    await attempt("no_dp", messages.encode("upload", round=0, update=signed(run, 0, dp=None)))
    good = signed(run, 0)
    await attempt("valid", messages.encode("upload", round=0, update=good))
    await attempt("duplicate", messages.encode("upload", round=0, update=good))
    return seen


def test_bad_input_gets_typed_errors_and_the_round_still_completes(tmp_path: Path) -> None:
    root = provision(
        tmp_path,
        (*HONEST, "mallory"),
        federation={"rounds": 1, "min_clients": 3},
        round={"timeout_s": 120.0, "weight_cap": 1000.0},
        transport={"max_message_bytes": LIMIT},
    )
    model = {"weight": np.zeros(NUMEL, dtype=np.float32)}
    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator(f"vector:{NUMEL}")
        seen = asyncio.run(misbehave(Kit.load(root / "client-mallory"), port, model))
        for c in HONEST:
            fed.start_client(c)
        assert fed.wait("aggregator") == 0, fed.logs()

    assert seen["garbage"] == "protocol"
    assert seen["unknown_type"] == "protocol"
    assert seen["bad_version"] == "protocol"
    assert seen["missing_field"] == "protocol"
    assert seen["oversized"] in ("message_too_large", "stream_reset")
    assert seen["truncated"] == "protocol"
    assert seen["wrong_round"] == "round_closed"
    assert seen["replay_in_wrong_round"] == "aggregation"
    assert seen["wrong_run"] == "aggregation"
    assert seen["tampered"] in ("bad_envelope", "protocol")
    assert seen["other_plan"] == "plan_mismatch"
    assert seen["no_dp"] == "plan_mismatch"
    assert seen["valid"] == "accepted"
    assert seen["duplicate"] == "duplicate_update"

    everyone = (*HONEST, "mallory")
    n = {c: RandomTrainer.samples_for(c) for c in everyone}
    expected = sum(
        n[c] * RandomTrainer.update_for(c, 0, model)["weight"].astype(np.float64) for c in everyone
    ) / sum(n.values())
    got = np.load(root / "agg-out" / "global-1.npy", allow_pickle=False)
    bound = get_preset("xfl-default").error_bound(0.06, 4, 4 * 100 / 1000)
    assert np.abs(got - expected).max() <= bound
