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
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from node.wire import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = MAX_FRAME_BYTES
CONNECT_TIMEOUT_S = 5.0
# after a pipe closed, freed memory goes back to the OS this much later (one trim per burst)
TRIM_DELAY_S = 1.0


class _Trim:
    pending: asyncio.AbstractEventLoop | None = None  # the loop a trim is scheduled on
    fn: Callable[[int], int] | None | bool = False  # False: not looked up yet


def _malloc_trim() -> Callable[[int], int] | None:
    if _Trim.fn is False:
        import ctypes
        import ctypes.util

        fn = None
        try:
            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            fn = getattr(libc, "malloc_trim", None)  # glibc only
        except OSError:
            fn = None
        _Trim.fn = fn
    return _Trim.fn or None  # type: ignore[return-value]


def _trim_now() -> None:
    _Trim.pending = None
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def trim_freed_memory_soon() -> None:
    """Hand the heap pages freed by a closed pipe back to the OS (glibc ``malloc_trim``).

    A transfer frees megabytes of 1 MiB buffers and small packet objects, but
    glibc keeps freed heap pages resident: without this a node that once moved a
    file over udp keeps ~8 MB it no longer uses. Called from every transport's
    close; the trim runs once, TRIM_DELAY_S later, for all pipes closed meanwhile.
    """
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
