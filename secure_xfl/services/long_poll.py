"""Held requests: a ``wait`` answer is given only after the state had time to move.

Clients ask the aggregator for work (``task``) and for the fixed cohort (``cohort``) and
are told ``wait`` until there is something. Answered at once, that costs each client up
to one poll interval after every change (a round opening, a cohort fixed), several
times per round. Held instead, the request is asked again each time the state moves,
and the answer leaves the moment it exists; only after ``hold_s`` without one is the
``wait`` sent, and the client asks again as before. Clients need no change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["LONG_POLL_S", "LongPoll"]

#: Longest a request is held. Well below the clients' ``peer_silence_s`` (10 s by
#: default), so a held call never looks like a dead server.
LONG_POLL_S = 2.0


class LongPoll:
    """Re-asks held requests whenever :meth:`moved` is called."""

    def __init__(self, lock: asyncio.Lock, hold_s: float = LONG_POLL_S) -> None:
        self.lock = lock
        """Held answers are computed under this lock (the state's)."""
        self.hold_s = hold_s
        self._changed = asyncio.Event()

    def moved(self) -> None:
        """The state may have moved: every held request asks again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def answer(self, ask: Callable[[], tuple[bytes, bool]]) -> bytes:
        """``ask()`` returns (reply, is-a-wait); the first reply that is not a wait, or
        the last one once ``hold_s`` has passed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.hold_s
        while True:
            async with self.lock:
                reply, waiting = ask()
                changed = self._changed  # taken under the lock: no move is missed
            left = end - loop.time()
            if not waiting or left <= 0:
                return reply
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
