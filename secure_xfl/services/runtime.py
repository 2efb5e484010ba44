"""What every long-running role shares: logging, signals, addresses, calls with backoff."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import sys
import time
from collections.abc import Callable, Collection
from typing import Any

from secure_xfl.errors import ConfigError, TransportError
from secure_xfl.protocol import messages
from secure_xfl.transport.config import TlsIdentity, TransportConfig
from secure_xfl.transport.errors import RemoteError
from secure_xfl.transport.rpc import RpcClient

log = logging.getLogger(__name__)


class _KeyValueFormatter(logging.Formatter):
    """``time level role logger: message`` lines, or one JSON object per line."""

    def __init__(self, role: str, as_json: bool) -> None:
        super().__init__()
        self.role = role
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(
                {
                    "time": ts,
                    "level": record.levelname,
                    "role": self.role,
                    "logger": record.name,
                    "msg": msg,
                }
            )
        return f"{ts} {record.levelname:<7} {self.role} {record.name}: {msg}"


def setup_logging(role: str, *, level: str = "INFO", as_json: bool = False) -> None:
    """Configure the root logger for one service process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter(role, as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("quic").setLevel(logging.WARNING)  # aioquic's per-packet chatter


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set ``stop`` so services finish their current step and exit."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


class Peer:
    """A reconnecting RPC client: exponential backoff with jitter on transport errors."""

    def __init__(
        self,
        *,
        tls: TlsIdentity,
        role: str,
        address: str,
        config: TransportConfig,
        max_wait_s: float = 120.0,
    ) -> None:
        self.tls = tls
        self.role = role
        self.host, self.port = parse_address(address)
        self.config = config
        self.max_wait_s = max_wait_s
        self._client: RpcClient | None = None

    async def _connect(self) -> RpcClient:
        delay, deadline = 0.2, time.monotonic() + self.max_wait_s
        while True:
            client = RpcClient(
                tls=self.tls,
                server_role=self.role,
                host=self.host,
                port=self.port,
                config=self.config,
            )
            try:
                await client.connect()
                return client
            except TransportError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info(
                    "%s at %s:%d not reachable (%s); retrying in %.1fs",
                    self.role,
                    self.host,
                    self.port,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                delay = min(delay * 2, 5.0)

    async def call(
        self,
        msg_type: str,
        *,
        expect: Collection[str],
        timeout: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one message; reconnect once on a dropped connection; return the reply."""
        payload = messages.encode(msg_type, **fields)
        for attempt in (1, 2):
            if self._client is None:
                self._client = await self._connect()
            try:
                reply = await self._client.call(payload, timeout=timeout)
                return messages.decode(reply, expect=expect)
            except RemoteError:
                raise
            except TransportError as exc:
                await self.close()
                if attempt == 2:
                    raise
                log.warning("call to %s failed (%s); reconnecting", self.role, exc)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Drop the connection (a later call reconnects)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


async def watch_crl(
    kit: Any,
    server: Any,
    stop: asyncio.Event,
    period_s: float = 2.0,
    on_change: Callable[[], None] | None = None,
) -> None:
    """Until ``stop``: reload the server's CRL whenever the kit's crl.pem changes.

    ``on_change`` runs after each reload (the aggregator re-reads its enrolment, so a
    revoked client stops counting and its uploads on a live connection are refused).
    """
    path = kit.path / "crl.pem"

    def mtime() -> float:
        return path.stat().st_mtime if path.exists() else 0.0

    seen = mtime()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except TimeoutError:
            now = mtime()
            if now != seen:
                seen = now
                server.reload_crl()  # revocations take effect without a restart
                if on_change is not None:
                    on_change()


def write_port_file(path: str | None, port: int) -> None:
    """Tell a supervisor (tests, the demo) which port a service bound."""
    if path:
        from pathlib import Path

        tmp = Path(path + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)
