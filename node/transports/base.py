"""The Pipe interface every transport implements, and the transport registry.

A Pipe is a reliable, ordered, message-oriented, *unauthenticated* connection:
``send(bytes)`` / ``recv() -> bytes`` / ``close()``. Message boundaries are
preserved. ``node/channel.py`` runs the authenticated handshake over a Pipe
and encrypts every later message, so transports know nothing about identities,
trust, files or gossip (they must not import those modules).

Rules every implementation follows:
* ``send`` applies backpressure: it awaits while the transport's send buffer is
  above its high-water mark, so a fast writer cannot grow memory without bound.
* ``recv`` raises ``ChannelClosed`` when the peer closed or the pipe failed; it
  never returns b"" to mean EOF.
* A message larger than ``MAX_MESSAGE_BYTES`` is refused on send (ProtocolError)
  and on receive (ProtocolError, and the pipe is closed).
* ``close`` is idempotent and never raises.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from node.wire import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = MAX_FRAME_BYTES
CONNECT_TIMEOUT_S = 5.0
# after a pipe closed, freed memory goes back to the OS this much later (one trim per burst)
TRIM_DELAY_S = 1.0
# glibc M_MMAP_THRESHOLD (see pin_mmap_threshold): blocks at least this large get their own
# mapping; above every pooled 1 MiB message buffer (1.1 MiB), below qh3's multi-MiB send buffer
MMAP_THRESHOLD_BYTES = 2 * 1024 * 1024
# glibc M_TRIM_THRESHOLD, set with it (a fixed mmap threshold freezes the dynamic trim
# threshold at its 128 KiB default: free() then shrinks the heap whenever a 1 MiB buffer at its
# top goes, and the next one faults its pages in again); trim_freed_memory_soon still trims
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3  # <malloc.h>


class _Trim:
    pending: asyncio.AbstractEventLoop | None = None  # the loop a trim is scheduled on
    fn: Callable[[int], int] | None | bool = False  # False: not looked up yet
    pinned: bool | None = None  # pin_mmap_threshold's outcome; None: not tried yet
    collect = False  # a pipe that leaves reference cycles behind closed since the last trim


@functools.cache
def _libc() -> Any:
    """The C library, looked up once (find_library may run ldconfig); None if not found."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.util.find_library("c")
        return ctypes.CDLL(lib) if lib else None
    except OSError:
        return None


def _libc_function(name: str) -> Any:
    return getattr(_libc(), name, None)  # malloc_trim and mallopt: glibc only


def _malloc_trim() -> Callable[[int], int] | None:
    if _Trim.fn is False:
        _Trim.fn = _libc_function("malloc_trim")
    return _Trim.fn or None  # type: ignore[return-value]


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES (once per process; True if set).

    glibc raises the threshold to the size of every mmapped block freed (up to 32 MiB),
    so after the first quic share qh3's stream send buffer (a Rust Vec that grows to
    4-8 MiB and is compacted in place) lives in the heap instead: its growth copies,
    and the holes it leaves keep the heap's top from being trimmed. Measured, 4 quic
    shares of 1 GiB in a row on one node pair: sender peak RSS 57, 63, 69.5, 70 MB
    (heap 26 MB, 12 MB resident after each share) against 58-60 MB every time with the
    threshold fixed. A fixed threshold also stops glibc's dynamic trim threshold."""
    if _Trim.pinned is not None:
        return _Trim.pinned  # tried once: the lookup may run ldconfig, not on every dial
    mallopt = _libc_function("mallopt")
    _Trim.pinned = mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if _Trim.pinned:
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return _Trim.pinned


def _trim_now() -> None:
    _Trim.pending = None
    fn = _malloc_trim()
    if fn is not None:
        if _Trim.collect:
            # a closed quic pipe's QuicConnection sits in reference cycles (qh3 keeps bound
            # methods of it, and so does tls_exporter's tap), so it and its native core -- a
            # send buffer of 4-8 MiB -- went only when the cyclic GC next ran: a 1 GiB
            # share's sender kept ~4 MB for a while, on top of which the next share peaked
            # at 63 MB. Only then: any close (an unauthenticated tcp one too) schedules a
            # trim, and a full collection is milliseconds of loop time
            _Trim.collect = False
            gc.collect()
        fn(0)


def trim_freed_memory_soon(*, collect_cycles: bool = False) -> None:
    """Hand the heap pages freed by a closed pipe back to the OS (glibc ``malloc_trim``).

    A transfer frees megabytes of 1 MiB buffers and small packet objects, but
    glibc keeps freed heap pages resident: without this a node that once moved a
    file over udp keeps ~8 MB it no longer uses. Called from every transport's
    close; the trim runs once, TRIM_DELAY_S later, for all pipes closed meanwhile.
    ``collect_cycles``: the closed pipe leaves reference cycles (quic), so the trim runs
    the cyclic GC first.
    """
    if collect_cycles:
        _Trim.collect = True
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if _Trim.pending is loop or _malloc_trim() is None:
        return
    _Trim.pending = loop
    loop.call_later(TRIM_DELAY_S, _trim_now)


class Pipe(Protocol):
    transport: str  # "tcp" | "udp" | "quic"
    remote: tuple[str, int]

    async def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...

    async def close(self) -> None: ...

    @property
    def closed(self) -> bool: ...


PipeHandler = Callable[[Pipe], Awaitable[None]]


class Listener(Protocol):
    transport: str

    @property
    def port(self) -> int: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    """Module-level API of node/transports/<name>.py."""

    name: str

    async def listen(self, host: str, port: int, handler: PipeHandler) -> Listener: ...

    async def connect(self, host: str, port: int, *,
                      timeout: float = CONNECT_TIMEOUT_S) -> Pipe: ...
