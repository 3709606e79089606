"""An in-memory channel pair with the SecureChannel interface, for tests and benchmarks
(transfer sessions, gossip services, in-process simulations).

Each direction is a bounded asyncio.Queue, so a fast sender waits (backpressure)
like it would on a real socket. ``close()`` on either end ends both: the other
side's ``recv`` raises ChannelClosed once it has drained what was sent.

Must not import the session, daemon or transports.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from node.errors import ChannelClosed

DEFAULT_QUEUE_MESSAGES = 4


class _Link:
    """One direction: a bounded FIFO with one writer and one reader."""

    def __init__(self, max_messages: int) -> None:
        self.items: collections.deque[bytes] = collections.deque()
        self.max_messages = max_messages
        self.closed = False
        self._data = asyncio.Event()
        self._space = asyncio.Event()

    async def put(self, data: bytes) -> None:
        while len(self.items) >= self.max_messages and not self.closed:
            self._space.clear()
            await self._space.wait()
        if self.closed:
            raise ChannelClosed("channel closed")
        self.items.append(data)
        self._data.set()

    async def get(self) -> bytes:
        while not self.items and not self.closed:
            self._data.clear()
            await self._data.wait()
        if self.items:
            item = self.items.popleft()
            self._space.set()
            return item
        raise ChannelClosed("peer closed the channel")

    def close(self) -> None:
        self.closed = True
        self._data.set()
        self._space.set()


@dataclass(eq=False)  # compared and hashed by identity, like a real channel
class MemoryChannel:
    peer: object
    peer_name: str
    _inbox: _Link
    _outbox: _Link
    transport: str = "memory"
    sent_bytes: int = 0

    async def send(self, data: bytes) -> None:
        if self._inbox.closed:
            raise ChannelClosed("channel closed")
        await self._outbox.put(bytes(data))
        self.sent_bytes += len(data)

    async def recv(self) -> bytes:
        return await self._inbox.get()

    async def close(self) -> None:
        self._outbox.close()
        self._inbox.close()

    @property
    def closed(self) -> bool:
        return self._outbox.closed


def memory_channel_pair(name_a: str = "alice", name_b: str = "bob", *,
                        max_messages: int = DEFAULT_QUEUE_MESSAGES,
                        peer_a: object = None, peer_b: object = None,
                        ) -> tuple[MemoryChannel, MemoryChannel]:
    """(a, b): a.peer_name is name_b and b.peer_name is name_a, as each sees the other."""
    ab = _Link(max_messages)
    ba = _Link(max_messages)
    a = MemoryChannel(peer_b, name_b, _inbox=ba, _outbox=ab)
    b = MemoryChannel(peer_a, name_a, _inbox=ab, _outbox=ba)
    return a, b


def channel_pair(a: object, b: object, *, max_messages: int = 1024
                 ) -> tuple[MemoryChannel, MemoryChannel]:
    """(end held by peer a, talking to b), (end held by b, talking to a)."""
    return memory_channel_pair("", "", max_messages=max_messages, peer_a=a, peer_b=b)
