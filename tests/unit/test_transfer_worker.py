"""node/transfer/worker.py: in-order calls, outcomes back on the loop, clean shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from node.transfer.worker import WorkerThread


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
