"""Bench-only timing of the bootstrap server: how long it held each request, and its loop stalls.

Off unless the server is started with ``stats=True`` (``python -m bootstrap
--bench-stats``, used by scripts/bench_bootstrap.py): a public server never
exposes its internals. When on, ``GET /_bench/stats`` answers (and with
``?reset=1`` also clears) per source address, and for ``?group=A,B`` those
addresses together:

* ``server_ms``: from the moment the request reached the middleware (headers
  parsed) to the moment its answer was written to the transport, so the wait
  for the address's turn and the handler are inside, the kernel and the
  client are not; count, p50, p99, max;
* the server's own loop stalls: how late a 1 ms sleep woke, beyond
  ``STALL_S``, and how much of that the server thread spent on the CPU
  (``time.thread_time``): a stall with ~0 CPU is time the process was
  runnable but waiting for a core (machine contention), a stall with CPU is
  work in this loop (server-side queueing).

Imports aiohttp and the limits' ``source_key`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from bootstrap.limits import source_key

# a loop wake-up later than this is a stall
STALL_S = 0.005
PROBE_INTERVAL_S = 0.001
# per source, the most recent samples kept (bounded memory whatever the traffic)
MAX_SAMPLES_PER_SOURCE = 20_000
MAX_SOURCES = 64
STATS_PATH = "/_bench/stats"
LONG_STALL_S = 0.020
MAX_LONG_STALLS = 100


class ServerStats:
    """Request hold times per source and loop stalls, for the bench; bounded."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.statuses: dict[str, dict[int, int]] = {}
        # connections per source admitted at accept time / refused there (bootstrap.server
        # counts them when stats are on)
        self.accepted: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        # times a source was blocked in the kernel (bootstrap.sockfilter)
        self.blocks: dict[str, int] = {}
        self.stall_count = 0
        self.stall_late_s = 0.0
        self.stall_cpu_s = 0.0
        self.stall_max_s = 0.0
        # the longest stalls as (late_ms, on_cpu_ms), and the cyclic GC's passes
        self.long_stalls: list[tuple[float, float]] = []
        self.gc_passes = 0
        self.gc_s = 0.0
        self.gc_max_s = 0.0

    def count_accept(self, source: str, refused: bool) -> None:
        _bump(self.refused if refused else self.accepted, source)

    def count_block(self, source: str) -> None:
        _bump(self.blocks, source)

    def add(self, source: str, held_s: float, status: int = 200) -> None:
        by_status = self.statuses.get(source)
        if by_status is None and len(self.statuses) < MAX_SOURCES:
            by_status = self.statuses[source] = {}
        if by_status is not None:
            by_status[status] = by_status.get(status, 0) + 1
        lst = self.samples.get(source)
        if lst is None:
            if len(self.samples) >= MAX_SOURCES:
                return
            lst = self.samples[source] = []
        if len(lst) < MAX_SAMPLES_PER_SOURCE:
            lst.append(held_s)

    def add_stall(self, late_s: float, cpu_s: float) -> None:
        self.stall_count += 1
        self.stall_late_s += late_s
        self.stall_cpu_s += min(cpu_s, late_s)
        self.stall_max_s = max(self.stall_max_s, late_s)
        if late_s > LONG_STALL_S and len(self.long_stalls) < MAX_LONG_STALLS:
            self.long_stalls.append((round(late_s * 1000, 1), round(cpu_s * 1000, 1)))

    def add_gc(self, pause_s: float) -> None:
        self.gc_passes += 1
        self.gc_s += pause_s
        self.gc_max_s = max(self.gc_max_s, pause_s)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif hasattr(self, "_gc_t0"):
            self.add_gc(time.perf_counter() - self._gc_t0)

    def summary(self, group: tuple[str, ...] = ()) -> dict[str, object]:
        """Per source, plus ``group``: the sources named there taken together."""
        sources = {source: _quantiles(lst) for source, lst in self.samples.items()}
        merged = [x for source in group for x in self.samples.get(source, ())]
        return {"sources": sources, "group": _quantiles(merged),
                "statuses": {src: {str(k): v for k, v in sorted(c.items())}
                             for src, c in self.statuses.items()},
                "accepted": dict(self.accepted), "refused_at_accept": dict(self.refused),
                "kernel_blocks": dict(self.blocks),
                "loop_stalls": {"count": self.stall_count,
                                "late_ms": self.stall_late_s * 1000,
                                "on_cpu_ms": self.stall_cpu_s * 1000,
                                "max_ms": self.stall_max_s * 1000,
                                "long": self.long_stalls},
                "gc": {"passes": self.gc_passes, "ms": self.gc_s * 1000,
                       "max_ms": self.gc_max_s * 1000}}


def _bump(counts: dict[str, int], source: str) -> None:
    """One more for ``source``, in at most MAX_SOURCES counters."""
    if source in counts or len(counts) < MAX_SOURCES:
        counts[source] = counts.get(source, 0) + 1


def _quantiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    if not s:
        return {"count": 0}
    return {"count": len(s), "p50_ms": s[len(s) // 2] * 1000,
            "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, "max_ms": s[-1] * 1000}


STATS_KEY: web.AppKey[ServerStats] = web.AppKey("bench_stats", ServerStats)


@web.middleware
async def timing_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Time the request until its answer is written (prepare + write_eof here; aiohttp
    then finds it sent and does nothing more)."""
    t0 = time.perf_counter()
    resp = await handler(request)
    if request.path != STATS_PATH:
        await resp.prepare(request)
        await resp.write_eof()
        request.app[STATS_KEY].add(source_key(request.remote), time.perf_counter() - t0,
                                   resp.status)
    return resp


async def _probe(stats: ServerStats) -> None:
    while True:
        t, c = time.perf_counter(), time.thread_time()
        await asyncio.sleep(PROBE_INTERVAL_S)
        late = time.perf_counter() - t - PROBE_INTERVAL_S
        if late > STALL_S:
            stats.add_stall(late, time.thread_time() - c)


async def handle_stats(request: web.Request) -> web.Response:
    stats = request.app[STATS_KEY]
    group = tuple(g for g in request.query.get("group", "").split(",") if g)[:MAX_SOURCES]
    body = json.dumps(stats.summary(group))
    if request.query.get("reset") == "1":
        stats.reset()
    return web.Response(text=body, content_type="application/json")


def enable(app: web.Application) -> None:
    """Add the timing middleware, the stall probe and the stats route to ``app``."""
    app[STATS_KEY] = ServerStats()
    app.middlewares.insert(0, timing_middleware)
    app.router.add_get(STATS_PATH, handle_stats)

    async def probe(app: web.Application) -> AsyncIterator[None]:
        stats = app[STATS_KEY]
        task = asyncio.create_task(_probe(stats))
        gc.callbacks.append(stats.gc_callback)
        try:
            yield
        finally:
            gc.callbacks.remove(stats.gc_callback)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(probe)
