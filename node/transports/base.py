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

from collections.abc import Awaitable, Callable
from typing import Protocol

from node.wire import MAX_FRAME_BYTES

MAX_MESSAGE_BYTES = MAX_FRAME_BYTES
CONNECT_TIMEOUT_S = 5.0


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
