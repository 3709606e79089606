"""A worker thread for a transfer's blocking disk work, cheap to hand work to.

``WorkerThread.submit(fn, *args)`` returns an asyncio future of the submitting loop;
one thread runs the calls in order and hands each outcome back with a single
``call_soon_threadsafe``. ``asyncio.to_thread`` / ``ThreadPoolExecutor.submit`` +
``wrap_future`` build a concurrent future, chain it to an asyncio one and copy its
state across: per 1 MiB chunk that cost more CPU than the chunk's BLAKE3 hash.

Must not import the channel, transports, session or daemon.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_Job = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


def _resolve(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return  # nobody waits any more; the call did run (a write is never half-cancelled)
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class WorkerThread:
    """One daemon thread running submitted calls in order (call it from the loop only)."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in the thread after what was submitted before; its future."""
        if self._closed:
            raise RuntimeError("worker thread is shut down")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((fut, fn, args))
        return fut

    def shutdown(self) -> None:
        """The thread ends after the calls already submitted (it is not waited for)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait (blocking) for the thread to end; True once it has. For tests and tools."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            fut, fn, args = job
            result: Any = None
            exc: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting coroutine
                exc = e
            try:
                self._loop.call_soon_threadsafe(_resolve, fut, result, exc)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to tell
            del fut, fn, args, job, result, exc  # drop the chunk before waiting again


async def wait_first(futures: set[asyncio.Future[Any]], timeout_s: float | None) -> None:
    """Return once any of ``futures`` is done or ``timeout_s`` passed (None: no limit).

    What ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` does for a driver loop,
    without checking and wrapping each awaitable and building done/pending sets on
    every call (the loop runs once per chunk). The futures are left as they are.
    """
    for fut in futures:
        if fut.done():
            return
    loop = asyncio.get_running_loop()
    wake: asyncio.Future[None] = loop.create_future()

    def on_done(_: object) -> None:
        if not wake.done():
            wake.set_result(None)

    for fut in futures:
        fut.add_done_callback(on_done)
    timer = loop.call_later(timeout_s, on_done, None) if timeout_s is not None else None
    try:
        await wake
    finally:
        if timer is not None:
            timer.cancel()
        for fut in futures:
            fut.remove_done_callback(on_done)
