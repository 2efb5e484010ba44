"""Real client processes tell a permanent failure from a transient one (issue 14).

* pointed at the key holder's port (the wrong role): exit at once with
  ``EXIT_PERMANENT`` and one line naming the wrong role;
* pointed at a port with nothing listening: retry until ``transport.connect_deadline_s``
  (3 s here), then exit 1 saying it gave up.

Neither log may hold an asyncio "Future exception was never retrieved" or a
traceback. (Wall-time bounds include process start-up.)
"""

from __future__ import annotations

import re
import socket
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from secure_xfl.services.client import EXIT_FAILED, EXIT_PERMANENT
from tests.federation import Federation, federation, provision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _edit_kit(kit: Path, section: str, **values: Any) -> None:
    """What an operator does: edit its own kit's config.toml, nothing else."""
    path = kit / "config.toml"
    cfg = tomllib.loads(path.read_text())
    cfg.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


def _closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_client(fed: Federation, name: str, port: int) -> None:
    fed.start(
        f"client-{name}",
        "client",
        "--kit",
        str(fed.root / f"client-{name}"),
        "--aggregator",
        f"127.0.0.1:{port}",
        "--trainer",
        "random",
    )


def test_permanent_and_transient_failures(tmp_path: Path) -> None:
    root = provision(tmp_path, ("alpha", "beta"), federation={"rounds": 1, "min_clients": 2})
    _edit_kit(root / "client-beta", "transport", connect_deadline_s=3.0)
    closed = _closed_udp_port()
    with federation(root) as fed:
        kh_port = fed.start_keyholder()
        starts = {"alpha": time.monotonic()}
        _start_client(fed, "alpha", kh_port)  # default deadline (600 s): must not matter
        starts["beta"] = time.monotonic()
        _start_client(fed, "beta", closed)

        wrong = fed.wait("client-alpha", timeout=30)
        wrong_s = time.monotonic() - starts["alpha"]
        gave_up = fed.wait("client-beta", timeout=40)
        gave_up_s = time.monotonic() - starts["beta"]
        logs = {n: fed.procs[f"client-{n}"].text() for n in ("alpha", "beta")}

    assert wrong == EXIT_PERMANENT, fed.logs()
    # Wall times include each process's start-up (imports, kit, CKKS context): a few
    # seconds, more on a loaded machine. The retry logic itself is checked by the logs.
    assert wrong_s < 20, f"{wrong_s:.1f}s\n{logs['alpha']}"
    errors = [line for line in logs["alpha"].splitlines() if " ERROR " in line]
    assert len(errors) == 1, logs["alpha"]
    assert "permanent failure" in errors[0] and "wrong role" in errors[0], errors
    assert "attempt 1 failed" not in logs["alpha"]  # never retried

    assert gave_up == EXIT_FAILED, fed.logs()
    assert 3 <= gave_up_s < 25, f"{gave_up_s:.1f}s\n{logs['beta']}"
    print(f"wrong role: exit {wrong} after {wrong_s:.1f}s; closed port: exit {gave_up} after "
          f"{gave_up_s:.1f}s")  # fmt: skip
    errors = [line for line in logs["beta"].splitlines() if " ERROR " in line]
    assert len(errors) == 1, logs["beta"]
    given_up = re.search(r"gave up after (\d+\.\d) s: aggregator at 127\.0\.0\.1:\d+", errors[0])
    assert given_up is not None and 3.0 <= float(given_up[1]) < 5.0, errors

    for text in logs.values():
        assert "never retrieved" not in text, text
        assert "Traceback" not in text, text
