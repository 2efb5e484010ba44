"""Named crash points for fault-injection tests against real processes.

``SECURE_XFL_FAILPOINTS=keyholder.after_mark,aggregator.after_pending@2`` makes the
process SIGKILL itself when it reaches one of the named points (``@R``: only in round
R; without it, in any round — the first one reached): a real,
unclean death at exactly the moment a test wants to recover from (a timer-driven
``kill`` from outside cannot hit a window of microseconds). Unset, :func:`hit` costs
one dictionary lookup. Production deployments never set the variable.

Points (each is documented where it is hit):
``aggregator.after_close``, ``aggregator.after_pending``, ``aggregator.after_release``,
``aggregator.after_checkpoint``, ``keyholder.after_decrypt``, ``keyholder.after_mark``,
``keyholder.after_ledger``, ``keyholder.before_reply``, ``client.after_mask_key`` (a
masked round's key is published, the upload not sent: a dropout after the cohort is fixed).
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENV", "POINTS", "armed", "hit"]

ENV = "SECURE_XFL_FAILPOINTS"

POINTS = frozenset(
    {
        "aggregator.after_close",
        "aggregator.after_pending",
        "aggregator.after_release",
        "aggregator.after_checkpoint",
        "keyholder.after_decrypt",
        "keyholder.after_mark",
        "keyholder.after_ledger",
        "keyholder.before_reply",
        "client.after_mask_key",
    }
)


def armed() -> dict[str, int | None]:
    """The points named in the environment → the round each is limited to (``None``:
    any). Unknown names are an error: a typo in a test would otherwise test nothing."""
    found: dict[str, int | None] = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, at = item.strip().partition("@")
        if not name:
            continue
        if name not in POINTS or (at and not at.isdigit()):
            raise ValueError(f"{ENV}: unknown failpoint {item.strip()!r}")
        found[name] = int(at) if at else None
    return found


def hit(name: str, round: int | None = None) -> None:
    """SIGKILL this process if ``name`` is armed (for ``round``, when it names one)."""
    if name not in POINTS:
        raise ValueError(f"unknown failpoint {name!r}")
    points = armed()
    if name in points and points[name] in (None, round):
        sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
