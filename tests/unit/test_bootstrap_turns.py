"""SourceTurns: at most N requests of one address handled at once, the rest wait FIFO.

Asyncio only, no sockets: the flood p99 fix of issue 9 item 8 (a source with 64
connections must not put 64 handlers in front of an honest client's one).
"""

from __future__ import annotations

import asyncio

import pytest

from bootstrap.server import ApiError, SourceTurns


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_source_gets_at_most_its_turns_and_others_are_not_held_up() -> None:
    turns = SourceTurns(per_source=2, waiting_per_source=10)
    await turns.acquire("flood")
    await turns.acquire("flood")
    third = asyncio.create_task(turns.acquire("flood"))
    await _settle()
    assert not third.done() and turns.waiting("flood") == 1
    # another address is served at once
    await asyncio.wait_for(turns.acquire("honest"), 0.1)
    turns.release("flood")  # the slot is handed to the waiter, not freed
    await asyncio.wait_for(third, 0.1)
    assert turns.active("flood") == 2 and turns.waiting("flood") == 0


async def test_waiters_are_served_in_order() -> None:
    turns = SourceTurns(per_source=1, waiting_per_source=10)
    await turns.acquire("a")
    order: list[int] = []

    async def one(i: int) -> None:
        await turns.acquire("a")
        order.append(i)
        turns.release("a")

    tasks = [asyncio.create_task(one(i)) for i in range(5)]
    await _settle()
    turns.release("a")
    await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
    assert order == [0, 1, 2, 3, 4]
    assert turns.active("a") == 0 and turns.waiting("a") == 0


async def test_a_full_queue_is_refused_at_once_with_429() -> None:
    turns = SourceTurns(per_source=1, waiting_per_source=2)
    await turns.acquire("a")
    waiters = [asyncio.create_task(turns.acquire("a")) for _ in range(2)]
    await _settle()
    with pytest.raises(ApiError) as err:
        await turns.acquire("a")
    assert err.value.status == 429 and err.value.retry_after_s is not None
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert turns.waiting("a") == 0


async def test_a_cancelled_waiter_leaves_no_slot_behind() -> None:
    turns = SourceTurns(per_source=1, waiting_per_source=10)
    await turns.acquire("a")
    gone = asyncio.create_task(turns.acquire("a"))
    nxt = asyncio.create_task(turns.acquire("a"))
    await _settle()
    gone.cancel()  # e.g. its client hung up
    await asyncio.gather(gone, return_exceptions=True)
    turns.release("a")
    await asyncio.wait_for(nxt, 0.1)
    turns.release("a")
    assert turns.active("a") == 0 and turns.waiting("a") == 0


async def test_a_waiter_cancelled_after_its_turn_came_passes_it_on() -> None:
    turns = SourceTurns(per_source=1, waiting_per_source=10)
    await turns.acquire("a")
    gone = asyncio.create_task(turns.acquire("a"))
    nxt = asyncio.create_task(turns.acquire("a"))
    await _settle()
    turns.release("a")  # hands the slot to `gone`...
    gone.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(gone, return_exceptions=True)
    await asyncio.wait_for(nxt, 0.1)
    assert turns.active("a") == 1
    turns.release("a")
    assert turns.active("a") == 0


def test_zero_turns_is_off() -> None:
    assert not SourceTurns(0, 10).enabled


async def test_a_source_past_its_pace_burst_starts_its_turns_at_the_pace() -> None:
    # handlers that finish without ever yielding never overlap, so the turns alone
    # would let a source run all its requests back to back in one loop turn
    turns = SourceTurns(per_source=2, waiting_per_source=10, pace_per_s=50.0, pace_burst=3)
    loop = asyncio.get_running_loop()
    started: list[float] = []
    for _ in range(8):
        await turns.acquire("flood")
        started.append(loop.time())
        turns.release("flood")
    assert started[2] - started[0] < 0.01  # the burst at once
    # then one every 20 ms: never ahead of that schedule (a late wake-up may be caught
    # up on by the next, so the gaps themselves vary on a busy machine)
    for k in range(3, 8):
        assert started[k] - started[2] >= (k - 2) * 0.02 - 0.002, started
    # another source has its own pace
    t0 = loop.time()
    await turns.acquire("honest")
    assert loop.time() - t0 < 0.01
    assert turns.active("flood") == 0


async def test_a_request_cancelled_while_paced_gives_its_slot_to_the_next() -> None:
    turns = SourceTurns(per_source=1, waiting_per_source=10, pace_per_s=1.0, pace_burst=1)
    moved: list[str] = []
    turns.line_moved = moved.append
    await turns.acquire("a")
    turns.release("a")
    paced = asyncio.create_task(turns.acquire("a"))  # holds the slot, waits ~1 s
    await _settle()
    assert not paced.done() and turns.active("a") == 1
    nxt = asyncio.create_task(turns.acquire("a"))
    await _settle()
    assert turns.waiting("a") == 1
    paced.cancel()
    with pytest.raises(asyncio.CancelledError):
        await paced
    # the slot went to the waiter (released once: not freed as well)
    await _settle()
    assert turns.active("a") == 1 and turns.waiting("a") == 0 and moved == ["a"]
    nxt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await nxt  # itself paced now: cancelled there, it frees the slot
    assert turns.active("a") == 0


def test_the_server_paces_every_source_by_default() -> None:
    from bootstrap.limits import LIST_RATE_PER_S, PACE_PER_S, REGISTER_RATE_PER_S, ServerLimits

    assert ServerLimits().pace_per_s == PACE_PER_S > REGISTER_RATE_PER_S + LIST_RATE_PER_S
    assert ServerLimits.unlimited().pace_per_s == 0.0

