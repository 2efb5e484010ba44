"""Helpers for security tests against real processes (imported by the test modules).

A federation is provisioned with the real CLI and its roles run as separate OS
processes (``tests.federation``); the attacker in these tests is the test
process itself, holding some party's real startup kit and talking real mTLS
QUIC to the real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_xfl.crypto.aggregate import Accumulator
from secure_xfl.crypto.codec import TensorLayout, layout_of
from secure_xfl.crypto.context import get_preset
from secure_xfl.crypto.dpspec import DPSpec
from secure_xfl.crypto.envelope import EncryptedAggregate, ProtectedUpdate
from secure_xfl.errors import TransportError
from secure_xfl.kit import Kit
from secure_xfl.privacy.protect import protect_vector
from secure_xfl.protocol import messages
from secure_xfl.protocol.coordinator import propose_plan
from secure_xfl.protocol.plan import RoundPlan
from secure_xfl.services.aggregator import coordinator_settings
from secure_xfl.services.client import client_policy
from secure_xfl.training.trainer import RandomTrainer
from secure_xfl.transport.dial import client_for
from secure_xfl.transport.errors import RemoteError
from secure_xfl.transport.rpc import RpcClient
from secure_xfl.transport.tcp import TlsRpcClient
from tests.federation import provision

HONEST = ("alpha", "beta", "gamma")
WEIGHT_CAP = 1000.0
#: Loopback-friendly transport: large datagrams (fast bulk uploads), short stall timeout.
TRANSPORT: dict[str, object] = {
    "max_datagram_size": 16384,
    "handshake_timeout_s": 5.0,
    "stream_timeout_s": 3.0,
    "idle_timeout_s": 30.0,
}


def provision_run(
    tmp: Path,
    clients: Sequence[str],
    *,
    rounds: int = 1,
    min_clients: int = 3,
    timeout_s: float = 120.0,
    transport: dict[str, object] | None = None,
    **sections: dict[str, object],
) -> Path:
    """A federation with the security suite's defaults (FedAvg, weight cap 1000)."""
    return provision(
        tmp,
        clients,
        federation={"rounds": rounds, "min_clients": min_clients, **sections.pop("federation", {})},
        round={"timeout_s": timeout_s, "weight_cap": WEIGHT_CAP, **sections.pop("round", {})},
        transport={**TRANSPORT, **(transport or {})},
        **sections,
    )


def zero_model(numel: int) -> dict[str, np.ndarray]:
    """The ``vector:N`` model the aggregator process starts from."""
    return {"weight": np.zeros(numel, dtype=np.float32)}


def layout_for(model: dict[str, np.ndarray]) -> TensorLayout:
    return layout_of({k: torch.from_numpy(v) for k, v in model.items()})


def update_vector(client: str, rnd: int, model: dict[str, np.ndarray]) -> np.ndarray:
    """The deterministic update RandomTrainer (the client processes) produce."""
    return RandomTrainer.update_for(client, rnd, model)["weight"].astype(np.float64)


def expected_average(
    clients: Iterable[str], rnd: int, model: dict[str, np.ndarray]
) -> tuple[np.ndarray, float]:
    """(FedAvg of the clients' updates, Σ multipliers) as the key holder should release it."""
    names = list(clients)
    n = {c: RandomTrainer.samples_for(c) for c in names}
    avg = sum(n[c] * update_vector(c, rnd, model) for c in names) / sum(n.values())
    return np.asarray(avg), sum(n.values()) / WEIGHT_CAP


def error_bound(n_clients: int, total_multiplier: float) -> float:
    """CKKS error bound on the released average of RandomTrainer updates (|x| ≤ 0.06)."""
    return get_preset("xfl-default").error_bound(0.06, n_clients, total_multiplier)


def protect_as(
    kit: Kit,
    vec: np.ndarray,
    model: dict[str, np.ndarray],
    rnd: int,
    *,
    run: str | None = None,
    client: str | None = None,
    signing_key: Any = None,
    weight: float | None = None,
    plan: RoundPlan | None = None,
    dp: DPSpec | bool | None = True,
) -> ProtectedUpdate:
    """A real protected update, as the kit's client process would make it: noised with
    the DP its own kit demands (``dp=True``; or the given spec), encrypted under the
    public context, weighted per the run's ``round.weighting``, signed over ``plan``
    (default: the plan the aggregator process proposes for ``rnd`` over ``model``)."""
    name = client or kit.config.party.name
    weighting = kit.config.round.weighting
    if weight is None:
        weight = float(RandomTrainer.samples_for(name))
        if weighting == "client":
            weight /= WEIGHT_CAP
    if plan is None:
        plan = aggregator_plan(kit, rnd, model)
    spec = client_policy(kit).dp if dp is True else (dp or None)
    return protect_vector(
        vec,
        ctx=kit.public_context(),
        preset=get_preset(kit.config.federation.preset),
        layout=layout_for(model),
        run=run or kit.config.federation.run,
        round=rnd,
        client=name,
        signing_key=signing_key or kit.tls.private_key,
        weight=float(weight),
        weighting=weighting,
        dp=spec,
        plan_digest=plan.digest,
        base_model_digest=plan.model_digest,
    )


def aggregator_plan(kit: Kit, rnd: int, model: dict[str, np.ndarray]) -> RoundPlan:
    """The plan the aggregator process of ``kit``'s federation proposes (same config)."""
    cfg = kit.config
    return propose_plan(
        coordinator_settings(kit),
        round=rnd,
        model=model,
        preset=get_preset(cfg.federation.preset),
        rule=cfg.round.rule,
        enrolled=len(kit.client_certificates()) if (kit.path / "clients").exists() else 3,
    )


def honest_update(
    root: Path,
    client: str,
    rnd: int,
    model: dict[str, np.ndarray],
    plan: RoundPlan | None = None,
) -> bytes:
    """Client ``client``'s genuine update for round ``rnd`` (what its process would send),
    signed over ``plan`` (default: the plan the aggregator proposes over ``model``)."""
    kit = Kit.load(root / f"client-{client}")
    return protect_as(kit, update_vector(client, rnd, model), model, rnd, plan=plan).encode()


def accumulate(
    root: Path, updates: Iterable[ProtectedUpdate | bytes], rnd: int, numel: int
) -> EncryptedAggregate:
    """Sum updates exactly as the aggregator does (its kit: public context, client certs)."""
    kit = Kit.load(root / "aggregator")
    certs = kit.client_certificates()
    acc = Accumulator(
        ctx=kit.public_context(),
        preset=get_preset(kit.config.federation.preset),
        run=kit.config.federation.run,
        round=rnd,
        layout_digest=layout_for(zero_model(numel)).digest,
        numel=numel,
        key_for=lambda name: certs[name],
        weighting=kit.config.round.weighting,
        weight_scale=WEIGHT_CAP if kit.config.round.weighting == "aggregator" else 1.0,
    )
    for u in updates:
        acc.add(u)
    return acc.result()


@dataclass
class Outcome:
    """How one request ended: ``ok`` with a body, or an error code."""

    code: str
    body: bytes = b""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "ok"


async def call(client: RpcClient | TlsRpcClient, payload: bytes, timeout: float = 30.0) -> Outcome:
    """One request on an open connection; typed errors become an :class:`Outcome`."""
    try:
        return Outcome("ok", await client.call(payload, timeout=timeout))
    except RemoteError as exc:
        return Outcome(exc.code, message=exc.message)
    except TransportError as exc:
        return Outcome(exc.code, message=str(exc))


async def hear_done(client: RpcClient | TlsRpcClient, after: int, attempt: int = 1 << 20) -> None:
    """Poll ``task`` like a client that will not upload again until the run is over, so
    the aggregator need not linger waiting for this peer to hear ``done``."""
    while True:
        out = await call(client, messages.encode("task", after=after, attempt=attempt))
        if out.ok and messages.decode(out.body)["t"] == "done":
            return
        await asyncio.sleep(0.5)


def connect(
    kit: Kit, server_role: str, port: int, protocol: str | None = None
) -> RpcClient | TlsRpcClient:
    """A client with the kit's real certificate over ``protocol``, by default the kit's
    transport (TLS/TCP when its ``protocol`` is ``tls``, else QUIC; use as ``async with``)."""
    protocol = protocol or kit.config.transport.protocol
    return client_for(protocol, kit.tls, server_role, "127.0.0.1", port, kit.config.transport)


async def call_once(kit: Kit, server_role: str, port: int, payload: bytes) -> Outcome:
    """Connect, send one request, close."""
    async with connect(kit, server_role, port) as client:
        return await call(client, payload)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def wait_for(cond: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    """Poll ``cond`` until true; fail with the processes' logs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {timeout}s:\n{logs()}")
        time.sleep(0.2)


# ---------------------------------------------------------------- process memory


def process_memory_contains(pid: int, needles: Sequence[bytes]) -> list[bool]:
    """Scan every writable mapping of a live process (heap, anonymous, stacks) for needles.

    Reading ``/proc/PID/mem`` needs ptrace-read access, which the parent of a
    same-user child has. Needles are searched in overlapping windows.
    """
    found = [False] * len(needles)
    overlap = max(len(n) for n in needles)
    window = 64 << 20
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if m is None or not m[3].startswith("rw"):
                continue
            lo, hi = int(m[1], 16), int(m[2], 16)
            pos, tail = lo, b""
            while pos < hi:
                size = min(window, hi - pos)
                try:
                    mem.seek(pos)
                    data = tail + mem.read(size)
                except OSError:  # guard pages, vsyscall: unreadable
                    break
                for i, needle in enumerate(needles):
                    if not found[i] and needle in data:
                        found[i] = True
                tail = data[-overlap:]
                pos += size
            if all(found):
                break
    return found
