"""Held task/cohort requests (services/long_poll.py): answered when the state moves."""

from __future__ import annotations

import asyncio
import time

from secure_xfl.services.long_poll import LONG_POLL_S, LongPoll


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_an_answer_that_is_not_a_wait_leaves_at_once() -> None:
    async def main() -> tuple[bytes, float]:
        poll = LongPoll(asyncio.Lock(), hold_s=5.0)
        start = time.monotonic()
        return await poll.answer(lambda: (b"round", False)), time.monotonic() - start

    reply, took = _run(main())
    assert reply == b"round" and took < 0.5


def test_a_held_request_gets_the_new_state_when_it_moves() -> None:
    async def main() -> tuple[bytes, float, int]:
        poll = LongPoll(asyncio.Lock(), hold_s=5.0)
        state = {"open": False, "asked": 0}

        def ask() -> tuple[bytes, bool]:
            state["asked"] += 1
            return (b"round", False) if state["open"] else (b"wait", True)

        async def open_round() -> None:
            await asyncio.sleep(0.2)
            poll.moved()  # a move that changes nothing: asked again, still held
            await asyncio.sleep(0.1)
            async with poll.lock:
                state["open"] = True
            poll.moved()

        start = time.monotonic()
        opener = asyncio.create_task(open_round())
        reply = await poll.answer(ask)
        await opener
        return reply, time.monotonic() - start, int(state["asked"])

    reply, took, asked = _run(main())
    assert reply == b"round"
    assert 0.25 < took < 2.0  # well before the 5 s hold
    assert asked == 3


def test_without_a_move_the_wait_is_sent_after_the_hold() -> None:
    async def main() -> tuple[bytes, float]:
        poll = LongPoll(asyncio.Lock(), hold_s=0.3)
        start = time.monotonic()
        return await poll.answer(lambda: (b"wait", True)), time.monotonic() - start

    reply, took = _run(main())
    assert reply == b"wait" and 0.3 <= took < 1.5


def test_many_held_requests_all_wake() -> None:
    async def main() -> list[bytes]:
        poll = LongPoll(asyncio.Lock(), hold_s=5.0)
        state = {"open": False}

        def ask() -> tuple[bytes, bool]:
            return (b"round", False) if state["open"] else (b"wait", True)

        held = [asyncio.create_task(poll.answer(ask)) for _ in range(20)]
        await asyncio.sleep(0.1)
        state["open"] = True
        poll.moved()
        return await asyncio.wait_for(asyncio.gather(*held), 2.0)

    assert _run(main()) == [b"round"] * 20


def test_the_hold_is_shorter_than_the_clients_silence_limit() -> None:
    from secure_xfl.transport import TransportConfig

    assert LONG_POLL_S < TransportConfig().peer_silence_s / 2
