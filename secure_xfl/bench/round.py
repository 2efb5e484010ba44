"""Round wall time: a protected round over the real services vs plaintext fp32.

Protected: ``secure-xfl keyholder``, ``aggregator`` and three ``client``
processes (real QUIC mTLS, CKKS, DP, signatures, the key holder's policy and
ledger), two rounds; the figure is round 1's ``seconds`` from the aggregator's
``rounds.jsonl`` (open → decrypted and applied), so process start-up and
connection set-up (round 0) are excluded.

Plaintext: a bench-only RpcServer that hands out the fp32 model and sums
fp32 updates, with three client processes over the same transport (the default,
``auto``), the same clip + noise, and the same held task requests
(:mod:`secure_xfl.services.long_poll`) and 0.2 s re-polls; round 1 is timed the same way.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from secure_xfl.bench.report import Row, row, stop_all
from secure_xfl.bench.transport import _provision, _tls
from secure_xfl.config import KitConfig
from secure_xfl.crypto import pki
from secure_xfl.privacy.dp import DPConfig, privatize
from secure_xfl.services.long_poll import LongPoll
from secure_xfl.transport import RpcServer, TransportConfig
from secure_xfl.transport.dial import dial

__all__ = ["plaintext_round", "protected_round", "run"]

CLIENTS = ("alpha", "beta", "gamma")
_CLI = [sys.executable, "-m", "secure_xfl.cli"]
_DP = {"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": 3}


def _start(
    root: Path, name: str, args: list[str], port: bool
) -> tuple[subprocess.Popen[bytes], int]:
    log = (root / f"{name}.log").open("wb")
    extra: list[str] = []
    pf = root / f"{name}.port"
    if port:
        extra = ["--listen", "127.0.0.1:0", "--port-file", str(pf)]
    proc = subprocess.Popen([*_CLI, *args, *extra], stdout=log, stderr=subprocess.STDOUT)
    if not port:
        return proc, 0
    deadline = time.monotonic() + 120
    while not pf.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not start: {(root / f'{name}.log').read_text()[-2000:]}"
            )
        time.sleep(0.1)
    time.sleep(0.05)  # the port file may be written but not yet flushed
    return proc, int(pf.read_text())


def protected_round(numel: int, preset: str, *, timeout: float = 540.0) -> float:
    """Seconds of round 1 of a 2-round run over the real services."""
    from secure_xfl.config import (
        FederationSettings,
        PrivacySettings,
        RecordPrivacySettings,
        RoundSettings,
    )
    from secure_xfl.kit import provision

    cfg = KitConfig(
        federation=FederationSettings(preset=preset, min_clients=3, rounds=2),
        privacy=PrivacySettings(
            clip_norm=_DP["clip_norm"],
            noise_multiplier=_DP["noise_multiplier"],
            # Synthetic updates (--trainer random): client-level DP only, no DP-SGD.
            record=RecordPrivacySettings(enabled=False),
        ),
        round=RoundSettings(weighting="client", timeout_s=timeout, weight_cap=1000.0),
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kits = root / "fed"
        provision(kits, federation="bench", clients=CLIENTS, cfg=cfg)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            kh, kh_port = _start(
                root, "keyholder", ["keyholder", "--kit", str(kits / "keyholder")], True
            )
            procs.append(kh)
            agg_args = [
                "aggregator",
                "--kit",
                str(kits / "aggregator"),
                "--keyholder",
                f"127.0.0.1:{kh_port}",
                "--model",
                f"vector:{numel}",
                "--out",
                str(root / "out"),
            ]
            agg, agg_port = _start(root, "aggregator", agg_args, True)
            procs.append(agg)
            for c in CLIENTS:
                args = [
                    "client",
                    "--kit",
                    str(kits / f"client-{c}"),
                    "--aggregator",
                    f"127.0.0.1:{agg_port}",
                    "--trainer",
                    "random",
                ]
                procs.append(_start(root, f"client-{c}", args, False)[0])
            if agg.wait(timeout=timeout) != 0:
                raise RuntimeError((root / "aggregator.log").read_text()[-3000:])
            lines = (root / "out" / "rounds.jsonl").read_text().splitlines()
            return float(json.loads(lines[1])["seconds"])
        finally:
            stop_all(procs)


# ---------------------------------------------------------------------------- plaintext


def _plain_server(directory: str, numel: int, ports: Any, result: Any) -> None:
    async def main() -> None:
        params = np.zeros(numel, dtype=np.float64)
        state: dict[str, Any] = {"round": 0, "count": 0, "opened": time.monotonic()}
        acc = np.zeros(numel, dtype=np.float64)
        done = asyncio.Event()
        times: list[float] = []

        poll = LongPoll(asyncio.Lock())  # held task requests, as the aggregator's

        def task(rnd: int) -> tuple[bytes, bool]:
            if state["round"] > 1 or rnd >= state["round"] + 1:
                return b"W", True
            head = int(state["round"]).to_bytes(4, "big")
            return b"R" + head + params.astype(np.float32).tobytes(), False

        async def handle(_peer: pki.PeerIdentity, data: bytes) -> bytes:
            op, rnd = data[:1], int.from_bytes(data[1:5], "big")
            if op == b"T":  # task: the model for the current round, or wait
                return await poll.answer(lambda: task(rnd))
            acc[:] += np.frombuffer(data, dtype=np.float32, offset=5)
            state["count"] += 1
            if state["count"] == len(CLIENTS):
                params[:] += acc / len(CLIENTS)
                acc[:] = 0
                now = time.monotonic()
                times.append(now - state["opened"])
                state.update(round=state["round"] + 1, count=0, opened=now)
                if state["round"] == 2:
                    done.set()
                poll.moved()
            return b"A"

        server = RpcServer(
            tls=_tls(Path(directory), "aggregator"),
            allowed_roles=["client"],
            handler=handle,
            config=TransportConfig(stream_timeout_s=300),
        )
        ports.put(await server.start("127.0.0.1", 0))
        await asyncio.wait_for(done.wait(), 540)
        result.put(times[1])
        await asyncio.sleep(0.5)
        await server.close()

    asyncio.run(main())


def _plain_client(directory: str, port: int, seed: int) -> None:
    async def main() -> None:
        dp = DPConfig(**_DP)  # type: ignore[arg-type]
        rng = np.random.default_rng(seed)
        # The transport the services choose by default (``auto``), like the protected run.
        client = await dial(tls=_tls(Path(directory), "client"), server_role="aggregator",
                            host="127.0.0.1", port=port,
                            config=TransportConfig(stream_timeout_s=300))  # fmt: skip
        try:
            last = -1
            while last < 1:
                reply = await client.call(b"T" + (last + 1).to_bytes(4, "big"))
                if reply == b"W":
                    await asyncio.sleep(0.2)
                    continue
                rnd = int.from_bytes(reply[1:5], "big")
                model = np.frombuffer(reply, dtype=np.float32, offset=5)
                update = rng.normal(scale=0.01, size=model.shape[0])
                noisy = privatize(update, dp, rng=rng).astype(np.float32)
                await client.call(b"U" + rnd.to_bytes(4, "big") + noisy.tobytes())
                last = rnd
        finally:
            await client.close()

    asyncio.run(main())


def plaintext_round(numel: int) -> float:
    """Seconds of round 1 of a 2-round plaintext fp32 run (bench-only server)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        _provision(Path(tmp))
        ports, result = ctx.Queue(), ctx.Queue()
        server = ctx.Process(target=_plain_server, args=(tmp, numel, ports, result))
        server.start()
        clients = []
        try:
            port = ports.get(timeout=120)
            for i in range(len(CLIENTS)):
                p = ctx.Process(target=_plain_client, args=(tmp, port, i))
                p.start()
                clients.append(p)
            return float(result.get(timeout=540))
        finally:
            for p in [*clients, server]:
                p.join(15)
                if p.is_alive():
                    p.kill()


def run(
    numel: int = 1_000_000, presets: tuple[str, ...] = ("xfl-default", "xfl-packed", "bfv-lanes")
) -> list[Row]:
    """One row per protected preset against the plaintext round."""
    plain = plaintext_round(numel)
    size = f"{numel / 1e6:.3g} M params"
    rows = []
    for preset in presets:
        ours = protected_round(numel, preset)
        rows.append(
            row(
                f"round wall time, 3 clients, {size}, one transport [{preset} vs plaintext fp32]",
                "s",
                ours,
                plain,
            )
        )
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from secure_xfl.bench.report import markdown

    print(markdown(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)))
