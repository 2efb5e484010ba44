"""Real client processes ride out an aggregator restart (issue 15).

The aggregator is stopped (SIGTERM) mid-run and restarted with the same command on
the same address. Every client must notice (one "unreachable; reconnecting for up to
N s" line), keep reconnecting with backoff, reconnect to the new process, say hello
again and carry on: it never exits 2 (a usage error) and never prints a traceback. A
client whose window (``transport.connect_deadline_s``, 4 s here) passes with no
aggregator back exits 1 with exactly one ERROR line (gave up).

This test asserts the client side. Whether the restarted aggregator resumes the run
(checkpoint, re-opened round) is the aggregator's: when its run ends well, the clients
that rode the restart out end well too.
"""

from __future__ import annotations

import json
import re
import signal
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from secure_xfl.services.client import EXIT_FAILED, EXIT_OK
from tests.federation import Federation, federation, provision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RIDERS = ("alpha", "beta")


def _edit_kit(kit: Path, section: str, **values: Any) -> None:
    path = kit / "config.toml"
    cfg = tomllib.loads(path.read_text())
    cfg.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


def _aggregator_command(fed: Federation, port: int) -> list[str]:
    root = fed.root
    return [
        "aggregator", "--kit", str(root / "aggregator"),
        "--keyholder", f"127.0.0.1:{fed.ports['keyholder']}",
        "--model", "vector:3000", "--out", str(root / "agg-out"),
        "--listen", f"127.0.0.1:{port}",
    ]  # fmt: skip


def _wait_for(fed: Federation, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in fed.procs[name].text():
        if fed.procs[name].popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{name}: no {text!r}\n{fed.logs()}")
        time.sleep(0.1)


def test_clients_ride_out_an_aggregator_restart(tmp_path: Path) -> None:
    root = provision(
        tmp_path, RIDERS, federation={"rounds": 5, "min_clients": 2}, round={"timeout_s": 10.0}
    )
    with federation(root) as fed:
        fed.start_keyholder()
        port = fed.start_aggregator()
        for name in RIDERS:
            fed.start_client(name, "--delay", "0.3")
        _wait_for(fed, "aggregator", "round 2 open", timeout=120)
        fed.procs["aggregator"].popen.send_signal(signal.SIGTERM)
        fed.wait("aggregator", timeout=30)
        for name in RIDERS:
            _wait_for(fed, f"client-{name}", "unreachable; reconnecting for up to", timeout=30)
        time.sleep(2.0)  # the clients back off meanwhile
        fed.start("aggregator-2", *_aggregator_command(fed, port))
        agg = fed.wait("aggregator-2", timeout=200)
        exits = {n: fed.wait(f"client-{n}", timeout=60) for n in RIDERS}
        logs = {n: fed.procs[f"client-{n}"].text() for n in RIDERS}
        outcome = json.loads((root / "agg-out" / "outcome.json").read_text())

    print(f"restarted aggregator: exit {agg}, outcome {outcome}; clients {exits}")
    for name in RIDERS:
        text = logs[name]
        assert exits[name] in (EXIT_OK, EXIT_FAILED), f"{name}: exit {exits[name]}\n{text}"
        window = re.search(r"unreachable; reconnecting for up to (\d+) s", text)
        assert window is not None and int(window[1]) >= 590, text  # the 600 s default
        assert re.search(r"reconnected to aggregator at 127\.0\.0\.1:\d+ after", text), text
        assert "reconnected: the aggregator's run" in text, text  # hello again
        assert "Traceback" not in text and "never retrieved" not in text, text
        if agg == 0 and outcome["ok"]:
            assert exits[name] == EXIT_OK, text
        else:  # a run that failed is said so once
            assert len([ln for ln in text.splitlines() if " ERROR " in ln]) == 1, text


def test_a_client_whose_window_passes_gives_up_with_exit_1(tmp_path: Path) -> None:
    root = provision(
        tmp_path, ("gamma",), federation={"rounds": 50, "min_clients": 1},
        round={"timeout_s": 10.0},
    )  # fmt: skip
    _edit_kit(root / "client-gamma", "transport", connect_deadline_s=4.0)
    with federation(root) as fed:
        fed.start_keyholder()
        fed.start_aggregator()
        fed.start_client("gamma", "--delay", "0.3")
        _wait_for(fed, "aggregator", "round 1 open", timeout=120)
        fed.procs["aggregator"].popen.send_signal(signal.SIGTERM)
        fed.wait("aggregator", timeout=30)
        gone = time.monotonic()
        gave_up = fed.wait("client-gamma", timeout=40)
        gave_up_s = time.monotonic() - gone
        text = fed.procs["client-gamma"].text()

    assert gave_up == EXIT_FAILED, text
    assert 3 <= gave_up_s < 30, f"{gave_up_s:.1f}s\n{text}"
    assert "unreachable; reconnecting for up to 4 s" in text, text
    errors = [ln for ln in text.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "gave up after" in errors[0], text
    assert "Traceback" not in text and "never retrieved" not in text, text
