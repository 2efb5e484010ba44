"""The load generator's worker process: many simulated clients in one asyncio loop.

Run by :mod:`secure_xfl.bench.loadtest` as
``python -m secure_xfl.bench.loadclient --fed DIR --names a,b --aggregator HOST:PORT``.
Each simulated client has its own provisioned kit (certificate and key), its own
QUIC connection (:class:`Peer`) and its own sans-IO :class:`ClientRound`, so it
speaks exactly the protocol a real client speaks and its plan is checked against
its own kit's policy. Only training is simulated: instead of running a trainer it
draws a random update of the plan's layout, which the real library path
(:func:`protect_vector`: clip, pre-weight, client-level noise, encrypt under the
public context, sign) then protects.

The worker must never import torch (about 300 MB of RSS per process, which is what
made 50 real clients unmeasurable on one host): nothing here needs it, and the
``exit`` report says whether it was imported, so the load test can fail when a
change drags it in.

Output: one JSON object per line on stdout (``upload``, ``done``, ``error``,
``exit``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from secure_xfl.crypto.codec import TensorLayout, TensorSpec
from secure_xfl.crypto.context import CKKSPreset, get_preset
from secure_xfl.kit import Kit
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
from secure_xfl.protocol.plan import ClientPolicy
from secure_xfl.protocol.seal import seal_upload
from secure_xfl.services.mask_client import MaskKeys
from secure_xfl.services.runtime import Peer
from secure_xfl.transport.errors import RemoteError

log = logging.getLogger("secure_xfl.loadclient")

#: Replies each request may get (as :mod:`secure_xfl.services.client` expects them).
_EXPECT = {
    "hello": {"welcome"}, "task": {"round", "wait", "done"}, "decline": {"ack"},
    "cohort": {"members", "wait"},
}  # fmt: skip

Emit = Callable[[dict[str, Any]], None]


def layout_of_arrays(model: dict[str, np.ndarray]) -> TensorLayout:
    """The :class:`TensorLayout` of numpy arrays, without torch (same digest as
    :func:`secure_xfl.crypto.codec.layout_of` over the equivalent tensors)."""
    specs = [TensorSpec(k, tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in model.items()]
    return TensorLayout(tuple(sorted(specs, key=lambda s: s.name)))


def random_update(rng: np.random.Generator, numel: int, clip_norm: float) -> np.ndarray:
    """A random update of about half the clip norm (so clipping is exercised only by
    the noise-free part's scale, as an honest update of that size would be)."""
    return rng.normal(0.0, 0.5 * clip_norm / max(1.0, numel**0.5), numel)


class SimClient:
    """One simulated client: the real protocol and protection, a random update."""

    def __init__(
        self,
        kit: Kit,
        *,
        aggregator: str,
        ctx: Any,
        preset: CKKSPreset,
        seed: int,
        emit: Emit,
    ) -> None:
        self.kit = kit
        self.name = kit.config.party.name
        self.ctx = ctx
        self.preset = preset
        self.emit = emit
        self.rng = np.random.default_rng(seed)
        self.peer = Peer(
            tls=kit.tls, role="aggregator", address=aggregator, config=kit.config.transport
        )
        self.machine = ClientRound(self.name, ClientPolicy.from_config(kit.config))
        self.masks = MaskKeys(kit, min_clients=kit.config.federation.min_clients)
        self.outcome: Done | None = None
        self._update: tuple[int, TensorLayout] | None = None

    def _train(self, act: Train) -> Trained:
        layout = layout_of_arrays(act.model)
        if layout.digest != act.plan.layout_digest:
            raise messages.ProtocolError("the model sent does not match the plan's layout")
        # Keep a seed, not the vector: N clients idle between train and seal would
        # otherwise hold N updates (8 B/param each) in one worker.
        self._update = (int(self.rng.integers(2**63)), layout)
        # One sample per round: with client weighting and weight_cap 1 every update
        # weighs 1, so each keeps the full client-level noise.
        return Trained(num_samples=1, loss=None, throughput=None)

    def _seal(self, act: SealAndUpload) -> bytes:
        assert self._update is not None
        seed, layout = self._update
        clip = self.kit.config.privacy.clip_norm
        vec = random_update(np.random.default_rng(seed), layout.numel, clip)
        return seal_upload(act, vec, layout, ctx=self.ctx, preset=self.preset, client=self.name,
                           signing_key=self.kit.tls.private_key,
                           mask=self.masks.cohort(act))  # fmt: skip

    async def _perform(self, act: Action) -> list[Action]:
        m, now = self.machine, time.monotonic
        if isinstance(act, Call):
            try:
                reply = await self.peer.call(act.method, expect=_EXPECT[act.method], **act.fields)
            except RemoteError as exc:
                if act.method != "cohort":
                    raise
                return m.on_error(exc.code, exc.message, now())
            return m.on_reply(reply["t"], reply, now())
        if isinstance(act, PublishKey):
            reply = await self.peer.call("mask_key", expect={"ack"}, round=act.round,
                                         epoch=act.epoch, key=self.masks.publish(act))  # fmt: skip
            return m.on_reply("ack", reply, now())
        if isinstance(act, Train):
            return m.trained(self._train(act))
        if isinstance(act, SealAndUpload):
            started = now()
            # TenSEAL holds the GIL while it encrypts, so a thread would not let the
            # other clients' packets through any sooner; seal inline.
            blob = self._seal(act)
            sealed = now()
            try:
                reply = await self.peer.call(
                    "upload", expect={"ack"}, round=act.round, update=blob,
                    throughput=act.throughput, timeout=600.0,
                )  # fmt: skip
            except RemoteError as exc:
                self.emit({"event": "refused", "client": self.name, "round": act.round,
                           "code": exc.code})  # fmt: skip
                return m.on_error(exc.code, exc.message, now())
            self.emit({
                "event": "upload", "client": self.name, "round": act.round, "bytes": len(blob),
                "seal_s": round(sealed - started, 4), "upload_s": round(now() - sealed, 4),
            })  # fmt: skip
            return m.on_reply("ack", reply, now())
        if isinstance(act, Decline):
            reply = await self.peer.call(
                "decline", expect={"ack"}, round=act.round, reason=act.reason, detail=act.detail
            )
            return m.on_reply("ack", reply, now())
        if isinstance(act, Done):
            self.outcome = act
            return []
        raise messages.ProtocolError(f"the load client cannot perform {type(act).__name__}")

    async def run(self) -> bool:
        """Perform the machine's actions until the run ends; True when it ended well."""
        queue: deque[Action] = deque(self.machine.start(time.monotonic()))
        try:
            while self.outcome is None:
                if queue:
                    queue.extend(await self._perform(queue.popleft()))
                    continue
                deadline = self.machine.next_deadline()
                if deadline is None:
                    break  # the machine waits on nothing: stuck, stop rather than hang
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                queue.extend(self.machine.handle_timer(time.monotonic()))
            return self.outcome is not None and self.outcome.ok
        finally:
            await self.peer.close()


async def run_clients(
    fed: Path, names: list[str], aggregator: str, *, seed: int, stagger_s: float, emit: Emit
) -> int:
    """Run every named client of federation folder ``fed``; returns how many failed."""
    kits = [Kit.load(fed / f"client-{n}", role="client") for n in names]
    preset = get_preset(kits[0].config.federation.preset)
    ctx = kits[0].public_context()  # one copy: every kit holds the same public context
    clients = [
        SimClient(k, aggregator=aggregator, ctx=ctx, preset=preset, seed=seed + i, emit=emit)
        for i, k in enumerate(kits)
    ]

    async def one(i: int, c: SimClient) -> bool:
        await asyncio.sleep(i * stagger_s)  # spread the handshakes a little
        try:
            ok = await c.run()
        except Exception as exc:  # one client's failure is reported, not fatal
            emit({"event": "error", "client": c.name, "error": f"{type(exc).__name__}: {exc}"})
            return False
        emit({"event": "done", "client": c.name, "ok": ok,
              "reason": c.outcome.reason if c.outcome else "stuck"})  # fmt: skip
        return ok

    results = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    return sum(1 for ok in results if not ok)


def _rss_kb() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Worker entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m secure_xfl.bench.loadclient")
    p.add_argument("--fed", required=True, help="federation folder (client-NAME kits)")
    p.add_argument("--names", required=True, help="comma-separated client names to run")
    p.add_argument("--aggregator", required=True, help="HOST:PORT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stagger", type=float, default=0.02, help="seconds between client starts")
    args = p.parse_args(argv)
    fmt = "%(asctime)s %(levelname)s loadclient %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=fmt)
    logging.getLogger("quic").setLevel(logging.WARNING)

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    names = [n for n in args.names.split(",") if n]
    failed = asyncio.run(
        run_clients(Path(args.fed), names, args.aggregator, seed=args.seed,
                    stagger_s=args.stagger, emit=emit)
    )  # fmt: skip
    emit({"event": "exit", "failed": failed, "clients": len(names),
          "torch": "torch" in sys.modules, "rss_hwm_kb": _rss_kb()})  # fmt: skip
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
