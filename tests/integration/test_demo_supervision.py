"""The demo supervises its children: refused configs, a dying child, SIGTERM, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from secure_xfl.errors import ConfigError
from secure_xfl.experiments.demo import DemoChildError, DemoConfig, _Procs, last_error_line

CLI = [sys.executable, "-m", "secure_xfl.cli"]
PY = sys.executable


# --- DemoConfig refuses values no run can work with ---------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rounds": 0},
        {"local_steps": 0},
        {"batch_size": 0},
        {"local_lr": 0.0},
        {"local_lr": -1e-3},
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"noise_multiplier": -0.1},
        {"clip_norm": 0.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"min_clients": 0},
        {"min_clients": 4},
        {"slow": {"cloud-z": 1.0}},
        {"slow": {"cloud-a": -1.0}},
        {"rule": "fedmedian"},
        {"partition": "iid"},
        {"clients": ()},
        {"clients": ("a", "a")},
        {"timeout_s": 0.0},
    ],
)
def test_demo_config_refuses(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="demo: "):
        DemoConfig(**kwargs)


def test_demo_config_accepts_defaults_and_no_dp_epsilon() -> None:
    d = DemoConfig()
    assert (d.rounds, d.local_steps, d.batch_size, d.min_clients) == (5, 30, 128, 2)
    DemoConfig(record_dp=False, epsilon=0.0)  # ε is only a budget under record-level DP
    DemoConfig(rule="gradient", partition="dynamic", slow={"cloud-c": 1.0}, min_clients=3)


def test_last_error_line() -> None:
    log = "\n".join(
        [
            "2024-01-01T00:00:00 INFO    client x: starting",
            "2024-01-01T00:00:01 ERROR   client x: round 0 failed",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in <module>',
            "    raise ProtocolError('no')",
            "secure_xfl.protocol.ProtocolError: field 'weight_cap' out of range",
            "",
        ]
    )
    assert last_error_line(log) == (
        "secure_xfl.protocol.ProtocolError: field 'weight_cap' out of range"
    )
    assert last_error_line("INFO fine\nINFO still fine\n") is None
    tb = "Traceback (most recent call last):\n  File 'a'\nKeyboardInterrupt\n"
    assert last_error_line(tb) == "KeyboardInterrupt"


# --- supervision with stand-in children (fast: tiny Python processes) -----------------

SLEEP = "import time; time.sleep(120)"
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
CRASH = (
    "import sys, time; time.sleep(0.3); print('INFO starting'); "
    "print('Traceback (most recent call last):'); print('  File \"c.py\", line 1'); "
    "print(\"ProtocolError: field 'weight_cap' out of range\"); sys.exit(1)"
)


def _fed(tmp: Path, clients: dict[str, str], agg: str = SLEEP, kh: str = SLEEP) -> _Procs:
    procs = _Procs(tmp, log_dest=tmp / "out-logs", stop_grace_s=1.0)
    procs.spawn("keyholder", [PY, "-c", kh])
    procs.spawn("aggregator", [PY, "-c", agg])
    for name, code in clients.items():
        procs.spawn(name, [PY, "-c", code])
    return procs


def _supervise(procs: _Procs, tmp: Path, clients: tuple[str, ...], min_clients: int = 2) -> None:
    try:
        procs.supervise(
            clients=clients,
            min_clients=min_clients,
            outcome_file=tmp / "outcome.json",
            grace_s=1.0,
            poll_s=0.1,
        )
    finally:
        procs.stop()


def test_a_crashing_client_stops_the_federation(tmp_path: Path) -> None:
    procs = _fed(tmp_path, {"a": CRASH, "b": SLEEP, "c": STUBBORN}, kh=STUBBORN)
    start = time.monotonic()
    with pytest.raises(DemoChildError) as err:
        _supervise(procs, tmp_path, ("a", "b", "c"))
    assert time.monotonic() - start < 10
    assert err.value.child == "a"
    assert err.value.log_path == tmp_path / "out-logs" / "a.log"
    msg = str(err.value)
    assert msg.startswith("a exited with status 1 while the run was going; its last error: ")
    assert "ProtocolError: field 'weight_cap' out of range" in msg
    assert f"log: {tmp_path / 'out-logs' / 'a.log'}" in msg
    assert all(p.poll() is not None for p in procs.procs.values())  # stubborn ones killed
    assert procs.procs["c"].returncode == -signal.SIGKILL


def test_the_key_holder_dying_is_a_failure(tmp_path: Path) -> None:
    procs = _fed(tmp_path, {"a": SLEEP, "b": SLEEP}, kh="import os; os.kill(os.getpid(), 9)")
    with pytest.raises(DemoChildError, match=r"^keyholder was killed by SIGKILL") as err:
        _supervise(procs, tmp_path, ("a", "b"))
    assert "no error in its log" in str(err.value)
    assert all(p.poll() is not None for p in procs.procs.values())


def test_an_aggregator_without_outcome_is_named(tmp_path: Path) -> None:
    procs = _fed(tmp_path, {"a": SLEEP, "b": SLEEP}, agg="print('ERROR boom'); raise SystemExit(1)")
    with pytest.raises(
        DemoChildError, match=r"^aggregator exited with status 1 without an outcome"
    ):
        _supervise(procs, tmp_path, ("a", "b"))


def test_a_child_dying_at_start_up_is_named(tmp_path: Path) -> None:
    procs = _Procs(tmp_path, stop_grace_s=1.0)
    procs.spawn("keyholder", [PY, "-c", "print('ERROR   keyholder: no kit'); raise SystemExit(1)"])
    try:
        with pytest.raises(DemoChildError) as err:
            procs.wait_port("keyholder", tmp_path / "kh.port", timeout=30)
    finally:
        procs.stop()
    assert str(err.value) == (
        "keyholder exited with status 1 before it was ready; its last error: ERROR   "
        f"keyholder: no kit; log: {tmp_path / 'keyholder.log'} (the demo stopped the other "
        "processes)"
    )


def test_refusals_are_fine_until_too_few_clients_remain(tmp_path: Path) -> None:
    refuse = "raise SystemExit(3)"
    # One of three refuses: two remain, min_clients 2 — the run goes on; it ends well.
    agg = f"import time, pathlib; time.sleep(2); pathlib.Path({str(tmp_path / 'outcome.json')!r})" \
        ".write_text('{}')"  # fmt: skip
    procs = _fed(tmp_path, {"a": refuse, "b": "raise SystemExit(0)", "c": SLEEP}, agg=agg)
    _supervise(procs, tmp_path, ("a", "b", "c"))  # returns: the outcome was written
    (tmp_path / "outcome.json").unlink()
    # Two of three refuse: one remains, fewer than min_clients 2.
    procs = _fed(tmp_path, {"a": refuse, "b": refuse, "c": SLEEP})
    with pytest.raises(DemoChildError, match="fewer than min_clients=2; gone: a, b"):
        _supervise(procs, tmp_path, ("a", "b", "c"))


# --- the real demo, as a process ------------------------------------------------------


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                out[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def _children_of(tmpdir: Path) -> list[int]:
    return [pid for pid, cmd in _cmdlines().items() if str(tmpdir) in cmd]


def _key_material(tmpdir: Path) -> list[Path]:
    return [*tmpdir.rglob("ca-key.pem"), *tmpdir.rglob("ckks-secret.ctx")]


def _start_demo(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    argv = [*CLI, "demo", "--out", str(out), "--rounds", "1", "--local-steps", "2",
            "--no-baseline"]  # fmt: skip
    demo = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return demo, tmpdir, out


def _wait_for(cond: Any, what: str, demo: subprocess.Popen[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = cond()
        if found:
            return found
        if demo.poll() is not None:
            out, err = demo.communicate()
            pytest.fail(f"demo exited ({demo.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.1)
    demo.kill()
    pytest.fail(f"no {what} after {timeout} s")


def _assert_clean(tmpdir: Path) -> None:
    assert _key_material(tmpdir) == []
    assert list(tmpdir.glob("secure-xfl-demo-*")) == []
    deadline = time.monotonic() + 5  # an orphan just killed may take a moment to go
    while _children_of(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _children_of(tmpdir) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_stops_when_a_client_dies(tmp_path: Path) -> None:
    demo, tmpdir, out = _start_demo(tmp_path)
    try:
        pids = _wait_for(
            lambda: [
                p for p, c in _cmdlines().items() if str(tmpdir) in c and "client-cloud-a" in c
            ],
            "client cloud-a",
            demo,
        )
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = demo.communicate(timeout=30)
        took = time.monotonic() - killed
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode != 0, stdout + stderr
    assert took < 30
    text = stdout + stderr
    assert "cloud-a was killed by SIGKILL while the run was going" in text, text[-3000:]
    assert f"log: {out / 'logs' / 'cloud-a.log'}" in text, text[-3000:]
    assert (out / "logs" / "cloud-a.log").exists() and (out / "logs" / "aggregator.log").exists()
    _assert_clean(tmpdir)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_demo_sigterm_removes_the_federation_and_its_children(tmp_path: Path) -> None:
    demo, tmpdir, out = _start_demo(tmp_path)
    try:
        _wait_for(lambda: list(tmpdir.glob("secure-xfl-demo-*/kh.port")), "key holder", demo)
        assert _key_material(tmpdir)  # the secret context and CA key are there now
        # Let the whole federation come up: key holder, aggregator and the clients.
        _wait_for(
            lambda: any("client-cloud-c" in c for c in map(_cmdlines().get, _children_of(tmpdir))),
            "clients",
            demo,
        )
        demo.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        demo.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 128 + signal.SIGTERM
    assert took < 20
    assert (out / "logs" / "keyholder.log").exists()
    _assert_clean(tmpdir)
