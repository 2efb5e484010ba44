"""Named crash points for fault-injection tests against real processes.

``SECURE_XFL_FAILPOINTS=keyholder.after_mark,aggregator.after_pending`` makes the
process SIGKILL itself the first time it reaches one of the named points: a real,
unclean death at exactly the moment a test wants to recover from (a timer-driven
``kill`` from outside cannot hit a window of microseconds). Unset, :func:`hit` costs
one dictionary lookup. Production deployments never set the variable.

Points (each is documented where it is hit):
``aggregator.after_close``, ``aggregator.after_pending``, ``aggregator.after_release``,
``aggregator.after_checkpoint``, ``keyholder.after_decrypt``, ``keyholder.after_mark``,
``keyholder.after_ledger``, ``keyholder.before_reply``.
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
    }
)


def armed() -> frozenset[str]:
    """The points named in the environment (unknown names are an error: a typo in a
    test would otherwise silently test nothing)."""
    names = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
    unknown = names - POINTS
    if unknown:
        raise ValueError(f"{ENV} names unknown failpoints: {', '.join(sorted(unknown))}")
    return names


def hit(name: str) -> None:
    """SIGKILL this process if ``name`` is armed."""
    if name not in POINTS:
        raise ValueError(f"unknown failpoint {name!r}")
    if name in armed():
        sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
