"""Closing pipes hands freed heap memory back to the OS once per burst (transports/base.py)."""

from __future__ import annotations

import asyncio

import pytest

from node.transports import base


def test_closes_in_a_burst_trim_once_after_the_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(base._Trim, "fn", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(base._Trim, "pending", None)
    monkeypatch.setattr(base, "TRIM_DELAY_S", 0.01)

    async def scenario() -> None:
        calls.clear()
        for _ in range(5):
            base.trim_freed_memory_soon()
        assert calls == []  # not at once: the closed pipes' buffers are freed first
        await asyncio.sleep(0.05)
        assert calls == [0]
        base.trim_freed_memory_soon()  # a later close trims again
        await asyncio.sleep(0.05)
        assert calls == [0, 0]

    asyncio.run(scenario())
    # a loop that ended with a trim pending does not block trims on the next loop
    base._Trim.pending = asyncio.new_event_loop()
    base._Trim.pending.close()
    asyncio.run(scenario())


def test_without_malloc_trim_or_a_loop_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base._Trim, "fn", None)
    monkeypatch.setattr(base._Trim, "pending", None)
    base.trim_freed_memory_soon()  # no running loop: a no-op, never raises

    async def scenario() -> None:
        base.trim_freed_memory_soon()
        assert base._Trim.pending is None  # not glibc: nothing scheduled

    asyncio.run(scenario())


def test_glibc_malloc_trim_is_found_on_linux() -> None:
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    base._Trim.fn = False
    assert base._malloc_trim() is not None
