"""The two ends of one WAN transfer (:mod:`secure_xfl.bench.wan`): what each transport
kind is, and the receiver and sender processes the orchestrator starts in the two
namespaces (``python -m secure_xfl.bench.wan_ends _serve|_send``).

Kinds: ``quic[-<cc>][-x<workers>]`` (secure-xfl QUIC with mTLS; a congestion
controller other than the default; ``workers`` > 1 sends the upload in parts over as
many connections from worker processes, ``transport/parts.py``), ``tls`` (asyncio TLS
1.3 over TCP with mutual authentication, the baseline) and ``ours-tls``
(``secure_xfl.transport.tcp``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from secure_xfl.bench.transport import _CHUNK, _ssl_context, _tls, count_upload
from secure_xfl.crypto import pki
from secure_xfl.transport import RpcClient, RpcServer, TransportConfig

__all__ = ["KINDS", "has_ours_tls", "kinds", "quic_kind", "upload_payload"]

_OURS_TLS = "secure_xfl.transport.tcp"
_PARALLEL = (2, 4)
_CONTROLLERS = ("reno", "cubic", "bbr")
KINDS = (
    "quic",
    *(f"quic-{cc}" for cc in _CONTROLLERS),
    *(f"quic-x{w}" for w in _PARALLEL),
    *(f"quic-reno-x{w}" for w in _PARALLEL),
    "tls",
    "ours-tls",
)
"""Every transport kind the endpoints know."""


def has_ours_tls() -> bool:
    """Whether secure-xfl's own TLS/TCP transport is installed."""
    return importlib.util.find_spec(_OURS_TLS) is not None


def kinds(datagram_sizes: Sequence[int] | None = None) -> list[tuple[str, int]]:
    """(transport, datagram size) pairs measured per condition; size 0 = not QUIC."""
    default = TransportConfig().max_datagram_size
    sizes = sorted({default, 1452} if datagram_sizes is None else set(datagram_sizes))
    out = [("quic", s) for s in sizes]
    cc = TransportConfig().congestion_control
    out += [(f"quic-{other}", 1452) for other in _CONTROLLERS if other != cc]
    # Parallel parts with the default controller, and with Reno, whose per-connection
    # window (not the CPU) is what limits it on a lossy path.
    out += [(f"quic-x{w}", 1452) for w in _PARALLEL]
    out += [(f"quic-reno-x{w}", 1452) for w in _PARALLEL if cc != "reno"] + [("tls", 0)]
    return out + ([("ours-tls", 0)] if has_ours_tls() else [])


def quic_kind(kind: str) -> tuple[str, int]:
    """(congestion controller, workers) of a ``quic[-<cc>][-x<workers>]`` kind."""
    cc, workers = TransportConfig().congestion_control, 1
    for part in kind.split("-")[1:]:
        if part.startswith("x"):
            workers = int(part[1:])
        else:
            cc = part
    return cc, workers


def upload_payload(size: int) -> bytes:
    """Exactly ``size`` bytes shaped like a request (``{"t": "upload", "b": <zeros>}``),
    since servers peek a request's type from its first bytes."""
    overhead = len(msgpack.packb({"t": "upload", "b": bytes(1 << 16)})) - (1 << 16)
    if size < (1 << 16) + overhead:
        raise ValueError("the upload must be at least 64 KiB")
    payload = msgpack.packb({"t": "upload", "b": bytes(size - overhead)})
    assert len(payload) == size
    return bytes(payload)


def _classes(kind: str) -> tuple[Any, Any]:
    if kind.startswith("quic"):
        return RpcServer, RpcClient
    module = importlib.import_module(_OURS_TLS)
    return module.TlsRpcServer, module.TlsRpcClient


def _config(kind: str, mds: int, timeout_s: float) -> TransportConfig:
    # A lossy transfer may be slow but is never stalled: keep the stream alive.
    stream = max(60.0, timeout_s)
    if not kind.startswith("quic"):
        return TransportConfig(stream_timeout_s=stream)
    cc, workers = quic_kind(kind)
    return TransportConfig(
        max_datagram_size=mds,
        stream_timeout_s=stream,
        congestion_control=cc,
        upload_workers=workers,
        max_connections_per_peer=max(8, workers),
        # The whole message and every part in flight claim the budget at once.
        max_buffered_bytes=1 << 30,
    )


# ---------------------------------------------------------------------------- endpoints


async def _serve(
    kind: str, directory: Path, host: str, mds: int, size: int, timeout_s: float
) -> None:
    """Receiver: print the bound port, answer each upload with its length, until
    stdin closes."""
    loop = asyncio.get_running_loop()
    if kind == "tls":
        ctx = _ssl_context(directory, "aggregator", server=True)
        tcp = await asyncio.start_server(count_upload, host, 0, ssl=ctx)
        print(tcp.sockets[0].getsockname()[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        tcp.close()
        return

    async def sink(_peer: pki.PeerIdentity, payload: bytes) -> bytes:
        return len(payload).to_bytes(8, "big")

    server_cls, _ = _classes(kind)
    args: dict[str, Any] = {
        "tls": _tls(directory, "aggregator"),
        "allowed_roles": ["client"],
        "handler": sink,
        "config": _config(kind, mds, timeout_s),
    }
    if kind.startswith("quic") and quic_kind(kind)[1] > 1:
        args["parallel_types"] = ("upload",)
        args["limits"] = {"upload": size + (1 << 16)}.__getitem__
    if "budget" in inspect.signature(server_cls).parameters:
        # The TLS server built by RpcServer itself: it shares the QUIC server's bounds.
        quic = RpcServer(**args)
        args |= {"max_message_bytes": quic.max_message_bytes}
        args |= {"limit_for": quic.limit_for, "budget": quic.budget}
    server = server_cls(**args)
    print(await server.start(host, 0), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await server.close()


async def _timed(work: Awaitable[Any], timeout_s: float) -> tuple[Any, float] | None:
    """``work``'s result and its seconds, or None when it ran past ``timeout_s``."""
    start = time.perf_counter()
    try:
        result = await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        return None
    return result, time.perf_counter() - start


async def _send(
    kind: str, directory: Path, host: str, port: int, mds: int, size: int, timeout_s: float
) -> dict[str, Any]:
    """Sender: one upload of ``size`` bytes, timed from the first byte written (parallel
    kinds: from the call, which includes connecting the workers)."""
    payload = upload_payload(size)
    if kind == "tls":
        ctx = _ssl_context(directory, "client", server=False)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)

        async def tcp_upload() -> bytes:
            view = memoryview(payload)
            writer.write(size.to_bytes(8, "big"))
            for offset in range(0, size, _CHUNK):
                writer.write(view[offset : offset + _CHUNK])
                await writer.drain()
            return await reader.readexactly(8)

        try:
            done = await _timed(tcp_upload(), timeout_s)
        finally:
            writer.close()
    elif kind.startswith("quic") and quic_kind(kind)[1] > 1:
        from secure_xfl.transport.parts import parallel_call

        config = _config(kind, mds, timeout_s)
        call = parallel_call(tls=_tls(directory, "client"), server_role="aggregator", host=host,
                             port=port, config=config, payload=payload,
                             workers=config.upload_workers)  # fmt: skip
        done = await _timed(call, timeout_s)
    else:
        _, client_cls = _classes(kind)
        async with client_cls(tls=_tls(directory, "client"), server_role="aggregator",
                              host=host, port=port,
                              config=_config(kind, mds, timeout_s)) as client:  # fmt: skip
            done = await _timed(client.call(payload), timeout_s)
    if done is None:
        return {"timed_out": True, "elapsed_s": timeout_s}
    reply, elapsed = done
    got = int.from_bytes(reply, "big")
    if got != size:
        raise RuntimeError(f"receiver acknowledged {got} of {size} bytes")
    return {"timed_out": False, "elapsed_s": elapsed, "mb_s": size / elapsed / 1e6}


def main(argv: list[str] | None = None) -> int:
    """Run one end: ``_serve`` (print the port, serve until stdin closes) or ``_send``."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m secure_xfl.bench.wan_ends _serve|_send")
    p.add_argument("role", choices=("_serve", "_send"))
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mds", type=int, default=0)
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    if a.role == "_serve":
        asyncio.run(_serve(a.kind, a.dir, a.host, a.mds, a.bytes, a.timeout))
        return 0
    out = asyncio.run(_send(a.kind, a.dir, a.host, a.port, a.mds, a.bytes, a.timeout))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
