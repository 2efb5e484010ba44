"""Run real federations for integration and security tests: separate OS processes on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w

from secure_xfl.training.trainer import RandomTrainer

CLI = [sys.executable, "-m", "secure_xfl.cli"]


#: Most multi-process tests run RandomTrainer clients, which cannot run DP-SGD: their
#: kits turn record-level DP off and, unless a test sets client-level σ, say so.
NO_RECORD_DP: dict[str, object] = {"allow_no_dp": True, "record": {"enabled": False}}


#: ``SECURE_XFL_TEST_TRANSPORT=tls`` (or ``quic``, ``auto``) runs every multi-process
#: federation over that transport (``[transport] protocol`` of every kit), so the whole
#: integration and security suites can be run over TLS/TCP:
#: ``SECURE_XFL_TEST_TRANSPORT=tls .venv/bin/python -m pytest tests/integration tests/security``.
TEST_TRANSPORT = os.environ.get("SECURE_XFL_TEST_TRANSPORT", "")


def provision(tmp: Path, clients: Sequence[str], **sections: dict[str, object]) -> Path:
    """`secure-xfl provision` with a config overriding the given sections (privacy
    defaults to :data:`NO_RECORD_DP` underneath whatever the test sets; the transport
    protocol to :data:`TEST_TRANSPORT` when set)."""
    privacy = dict(sections.get("privacy", {}))
    if "record" in privacy:
        privacy["record"] = {**NO_RECORD_DP["record"], **privacy["record"]}  # type: ignore[dict-item]
    sections = {**sections, "privacy": {**NO_RECORD_DP, **privacy}}
    if TEST_TRANSPORT:
        transport = dict(sections.get("transport", {}))
        transport.setdefault("protocol", TEST_TRANSPORT)
        sections["transport"] = transport
    cfg = tmp / "base.toml"
    cfg.write_text(tomli_w.dumps(sections))
    out = tmp / "fed"
    subprocess.run(
        [
            *CLI,
            "provision",
            "--federation",
            "test",
            "--clients",
            ",".join(clients),
            "--out",
            str(out),
            "--config",
            str(cfg),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def _copy(popen: subprocess.Popen[bytes], log: Path) -> None:
    assert popen.stdout is not None
    with log.open("ab", buffering=0) as out:
        for line in popen.stdout:
            out.write(line)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)
    """The command line, with the port it bound instead of ``:0`` (for restarts)."""
    copier: threading.Thread | None = None

    def drained(self) -> None:
        """After the process exited: wait until its last lines reached the log."""
        if self.copier is not None:
            self.copier.join(timeout=10)

    def text(self) -> str:
        if self.popen.poll() is not None:
            self.drained()
        return self.log.read_text(errors="replace")


@dataclass
class Federation:
    root: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(
        self, name: str, *args: str, port_file: bool = False, env: dict[str, str] | None = None
    ) -> Proc:
        log = self.root / f"{name}.log"
        extra: list[str] = []
        pf = self.root / f"{name}.port"
        if port_file:
            pf.unlink(missing_ok=True)
            extra = ["--listen", "127.0.0.1:0", "--port-file", str(pf)]
        log.write_bytes(b"")
        return self._spawn(name, [*CLI, *args, *extra], log, pf if port_file else None, env)

    def _spawn(
        self, name: str, argv: list[str], log: Path, pf: Path | None, env: dict[str, str] | None
    ) -> Proc:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Through a pipe that this process copies to the log (appending: a restarted
        # process's log follows its predecessor's; start() empties it), so a test can
        # take a child's disk away (RLIMIT_FSIZE) without also silencing its log.
        popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env
        )
        copier = threading.Thread(target=_copy, args=(popen, log), daemon=True)
        copier.start()
        proc = Proc(name, popen, log, argv, copier)
        self.procs[name] = proc
        if pf is not None:
            deadline = time.monotonic() + 60
            while not pf.exists():
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{proc.text()}")
                time.sleep(0.1)
            self.ports[name] = int(pf.read_text())
            proc.argv = [a if a != "127.0.0.1:0" else f"127.0.0.1:{self.ports[name]}" for a in argv]
        return proc

    def restart(self, name: str, env: dict[str, str] | None = None) -> Proc:
        """Start ``name`` again with the same command line (and the port it had bound),
        after it exited or was killed; ``env`` replaces the extra environment."""
        old = self.procs[name]
        if old.popen.poll() is None:
            raise RuntimeError(f"{name} is still running")
        pf = self.root / f"{name}.port"
        pf.unlink(missing_ok=True)
        with old.log.open("ab") as fh:
            fh.write(f"\n=== restarted {name} ===\n".encode())
        has_pf = "--port-file" in old.argv
        return self._spawn(name, list(old.argv), old.log, pf if has_pf else None, env)

    def start_keyholder(self, env: dict[str, str] | None = None) -> int:
        self.start(
            "keyholder", "keyholder", "--kit", str(self.root / "keyholder"), port_file=True, env=env
        )
        return self.ports["keyholder"]

    def start_aggregator(
        self, model: str = "vector:3000", env: dict[str, str] | None = None
    ) -> int:
        self.start(
            "aggregator",
            "aggregator",
            "--kit",
            str(self.root / "aggregator"),
            "--keyholder",
            f"127.0.0.1:{self.ports['keyholder']}",
            "--model",
            model,
            "--out",
            str(self.root / "agg-out"),
            port_file=True,
            env=env,
        )
        return self.ports["aggregator"]

    def start_client(self, name: str, *extra: str, trainer: str = "random") -> Proc:
        """A client process; ``--trainer`` is required by the CLI (a ``--trainer`` in
        ``extra`` wins, as the last one given)."""
        return self.start(
            f"client-{name}",
            "client",
            "--kit",
            str(self.root / f"client-{name}"),
            "--aggregator",
            f"127.0.0.1:{self.ports['aggregator']}",
            "--trainer",
            trainer,
            *extra,
        )

    def wait(self, name: str, timeout: float = 180) -> int:
        proc = self.procs[name]
        try:
            rc = proc.popen.wait(timeout=timeout)
            proc.drained()
            return rc
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout}s:\n{proc.text()}") from None

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
            proc.drained()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.text()[-3000:]}" for n, p in self.procs.items())


@contextmanager
def federation(root: Path) -> Iterator[Federation]:
    fed = Federation(root)
    try:
        yield fed
    finally:
        fed.stop_all()


def run_to_completion(root: Path, clients: Sequence[str], model: str) -> Federation:
    """Start key holder, aggregator and every client; wait until all exit successfully."""
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator(model)
        for c in clients:
            fed.start_client(c)
        assert fed.wait("aggregator") == 0, fed.logs()
        for c in clients:
            assert fed.wait(f"client-{c}", timeout=60) == 0, fed.logs()
    return fed


def expected_models(clients: Sequence[str], numel: int, rounds: int) -> list[np.ndarray]:
    """The global model after each round (index 0: the initial zeros) of a FedAvg run of
    random-trainer ``clients`` on ``vector:numel``, recomputed in plaintext from their
    deterministic updates."""
    model = {"weight": np.zeros(numel, dtype=np.float32)}
    params = np.zeros(numel)
    out = [params.copy()]
    for r in range(rounds):
        n = {c: RandomTrainer.samples_for(c) for c in clients}
        avg = sum(
            n[c] * RandomTrainer.update_for(c, r, model)["weight"].astype(np.float64)
            for c in clients
        ) / sum(n.values())
        params = params + avg
        model = {"weight": params.astype(np.float32)}
        out.append(params.copy())
    return out
