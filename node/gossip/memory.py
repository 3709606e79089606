"""In-memory channel pairs (asyncio queues) shaped like node/channel.py's SecureChannel.

For tests and in-process simulations of the gossip service: ``channel_pair(a, b)``
returns two connected ends; closing either end makes both ends' ``recv`` raise
ChannelClosed. Imports node.identity and node.errors only.
"""

from __future__ import annotations

import asyncio

from node.errors import ChannelClosed
from node.identity import PeerId

_CLOSE = object()


class MemoryChannel:
    def __init__(self, me: PeerId, peer: PeerId, inbox: asyncio.Queue[object],
                 outbox: asyncio.Queue[object], peer_name: str = "") -> None:
        self.me = me
        self.peer = peer
        self.peer_name = peer_name
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self.sent = 0

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed("channel closed")
        self.sent += 1
        self._outbox.put_nowait(bytes(data))

    async def recv(self) -> bytes:
        if self._closed:
            raise ChannelClosed("channel closed")
        item = await self._inbox.get()
        if item is _CLOSE:
            self._closed = True
            raise ChannelClosed("peer closed the channel")
        assert isinstance(item, bytes)
        return item

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outbox.put_nowait(_CLOSE)
            self._inbox.put_nowait(_CLOSE)


def channel_pair(a: PeerId, b: PeerId) -> tuple[MemoryChannel, MemoryChannel]:
    """(end held by a, talking to b), (end held by b, talking to a)."""
    q_ab: asyncio.Queue[object] = asyncio.Queue()
    q_ba: asyncio.Queue[object] = asyncio.Queue()
    return MemoryChannel(a, b, q_ba, q_ab), MemoryChannel(b, a, q_ab, q_ba)
