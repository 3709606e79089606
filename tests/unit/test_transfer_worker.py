"""node/transfer/worker.py: in-order calls, outcomes back on the loop, clean shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from node.transfer.worker import WorkerThread, wait_first


async def test_calls_run_in_order_in_one_other_thread_and_results_come_back() -> None:
    worker = WorkerThread("test-worker")
    seen: list[tuple[int, str]] = []

    def job(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * n

    try:
        futs = [worker.submit(job, n) for n in range(20)]
        assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [n * n for n in range(20)]
    finally:
        worker.shutdown()
    assert [n for n, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"test-worker"}
    assert await asyncio.to_thread(worker.join, 5)


async def test_an_exception_reaches_the_waiter_and_the_thread_goes_on() -> None:
    worker = WorkerThread("test-worker")

    def boom() -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(worker.submit(boom), 5)
        assert await asyncio.wait_for(worker.submit(lambda: "still here"), 5) == "still here"
    finally:
        worker.shutdown()
    assert await asyncio.to_thread(worker.join, 5)


async def test_a_cancelled_waiter_is_left_alone_and_later_calls_still_run() -> None:
    worker = WorkerThread("test-worker")
    gate = threading.Event()
    try:
        blocked = worker.submit(gate.wait, 5)
        queued = worker.submit(lambda: 1)
        queued.cancel()  # the call still runs; its outcome is dropped, not an error
        after = worker.submit(lambda: 2)
        gate.set()
        assert await asyncio.wait_for(blocked, 5) is True
        assert await asyncio.wait_for(after, 5) == 2
        assert queued.cancelled()
    finally:
        worker.shutdown()
    assert await asyncio.to_thread(worker.join, 5)
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(lambda: 3)


async def test_wait_first_returns_on_the_first_done_future_and_cleans_up() -> None:
    loop = asyncio.get_running_loop()
    a: asyncio.Future[int] = loop.create_future()
    b: asyncio.Future[int] = loop.create_future()
    loop.call_soon(a.set_result, 1)
    await asyncio.wait_for(wait_first({a, b}, None), 5)
    assert a.done() and not b.done()
    b.set_result(2)
    await asyncio.wait_for(wait_first({a, b}, None), 5)  # already done: returns at once


async def test_wait_first_times_out_and_a_cancel_removes_its_callbacks() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    t0 = loop.time()
    await asyncio.wait_for(wait_first({fut}, 0.05), 5)
    assert loop.time() - t0 >= 0.04 and not fut.done()
    task = asyncio.ensure_future(wait_first({fut}, None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fut.set_result(None)  # completing it after the cancel is harmless
    assert fut.done()
