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


_MMAP_CHECK = """
import ctypes, sys
from node.transports import base

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

info = base._libc_function("mallinfo2")
if info is None:
    sys.exit(3)
info.restype = Mallinfo2
if sys.argv[1] == "pin" and not base.pin_mmap_threshold():
    sys.exit(4)
big = bytearray(16 << 20)  # mmapped, then freed: raises an unpinned threshold to 16 MiB
del big
before = info().hblkhd
block = bytearray(3 << 20)
mapped = info().hblkhd - before >= 3 << 20  # its own mapping, not the heap
del block
small = bytearray(base.MMAP_THRESHOLD_BYTES // 2)  # a pooled 1 MiB buffer: the heap
print(mapped, info().hblkhd - before < base.MMAP_THRESHOLD_BYTES // 2)
"""


def test_pinned_mmap_threshold_keeps_large_blocks_out_of_the_heap() -> None:
    """After a large mmapped block is freed, glibc would raise its threshold and put the
    next multi-MiB block (qh3's send buffer) in the heap; pinned, such blocks stay mapped.
    In a fresh process: in a long-lived one a free heap chunk may serve the block anyway."""
    import subprocess
    import sys

    def run(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", _MMAP_CHECK, mode], capture_output=True,
                              text=True, timeout=60, check=False)
        if done.returncode in (3, 4):
            pytest.skip("needs glibc (mallopt, mallinfo2)")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("pin") == "True True"
    assert run("default") == "False True"  # what the pin changes


def test_the_trim_first_frees_closed_objects_held_only_by_cycles() -> None:
    """A closed pipe's QuicConnection is freed by the cyclic GC only (qh3 keeps bound
    methods of it); the trim after a quic close collects it, so its native buffers go
    too. A trim after any other close (an unauthenticated tcp one, say) runs no
    collection: any peer can cause one a second, and a full collection takes ms."""
    import gc
    import weakref

    class Held:
        pass

    gc.disable()
    try:
        obj = Held()
        obj.me = obj  # type: ignore[attr-defined]
        obj.buf = bytearray(1 << 20)  # type: ignore[attr-defined]
        ref = weakref.ref(obj)
        del obj
        assert ref() is not None  # only a collection frees a cycle
        base._trim_now()  # a trim no quic close asked for: no collection
        assert ref() is not None
        base._Trim.collect = True  # what trim_freed_memory_soon(collect_cycles=True) sets
        base._trim_now()
        assert ref() is None or base._malloc_trim() is None
        assert base._Trim.collect is False or base._malloc_trim() is None
    finally:
        gc.enable()


def test_a_libc_without_mallopt_is_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """musl, macOS: no mallopt. The lookup (ctypes.util.find_library, which may run
    ldconfig) happens once per process, not on every quic dial."""
    lookups: list[str] = []

    def lookup(name: str) -> None:
        lookups.append(name)
        return None

    monkeypatch.setattr(base, "_libc_function", lookup)
    monkeypatch.setattr(base._Trim, "pinned", None)
    assert base.pin_mmap_threshold() is False
    assert base.pin_mmap_threshold() is False
    assert lookups == ["mallopt"]
