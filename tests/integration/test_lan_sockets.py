"""LanDiscovery over real UDP sockets on 127.0.0.1 (explicit unicast targets)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from node.contact import ContactRecord
from node.discovery.lan import LanDiscovery, PeerSink, encode_announcement
from node.identity import Identity, PeerId

A = Identity.generate("a", seed=b"\x0a" * 32)
B = Identity.generate("b", seed=b"\x0b" * 32)
EVIL = Identity.generate("evil", seed=b"\x0c" * 32)


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Book:
    def __init__(self) -> None:
        self.added: dict[PeerId, ContactRecord] = {}
        self.gone: list[PeerId] = []

    def sink(self) -> PeerSink:
        return PeerSink(add=lambda r: self.added.__setitem__(r.peer_id, r),
                        seen=lambda pid: None, gone=self.gone.append)


def node(who: Identity, book: Book) -> LanDiscovery:
    record = ContactRecord.create(who, ["127.0.0.1"], {"tcp": 9000}, 1)
    return LanDiscovery(who.peer_id, lambda: record, book.sink(), port=0,
                        bind_host="127.0.0.1", targets=[], interval_s=30.0)


async def test_a_new_instance_makes_the_other_node_announce_at_once() -> None:
    book_a, book_b = Book(), Book()
    a, b = node(A, book_a), node(B, book_b)
    tasks: list[asyncio.Task[None]] = []
    try:
        port_a = await a.start()
        a.targets = [("127.0.0.1", port_a)]
        tasks.append(asyncio.create_task(a.run()))  # announces into the void (and to itself)
        await wait_for(lambda: a.announcements_sent == 1)
        port_b = await b.start()
        a.targets = b.targets = [("127.0.0.1", port_a), ("127.0.0.1", port_b)]
        t0 = time.monotonic()
        tasks.append(asyncio.create_task(b.run()))
        # b's first announcement reaches a; a answers at once, not after its 30 s interval
        await wait_for(lambda: B.peer_id in book_a.added and A.peer_id in book_b.added)
        assert time.monotonic() - t0 < 2.0
        assert a.announcements_sent == 2
        assert a.cache.stats["own"] >= 1  # a heard itself and ignored it
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.stop()
        await b.stop()


async def test_forged_and_garbage_packets_add_nothing() -> None:
    book = Book()
    a = node(A, book)
    try:
        port = await a.start()
        wire = ContactRecord.create(B, ["127.0.0.1"], {"tcp": 1}, 5).to_wire()
        wire[2] = ["127.0.0.66"]  # B's signature over other hosts
        from node.discovery.lan import MAGIC
        from node.wire import packb

        forged = MAGIC + packb([1, b"\x01" * 8, wire])
        good = encode_announcement(ContactRecord.create(EVIL, ["127.0.0.1"], {"tcp": 1}, 1),
                                   b"\x02" * 8)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
            for data in (forged, b"x" * 3000, b"p2pfsLAN\xc1", good):
                s.sendto(data, ("127.0.0.1", port))
        # the valid one, sent last, proves the others were processed (and refused)
        await wait_for(lambda: EVIL.peer_id in book.added)
        assert set(book.added) == {EVIL.peer_id}
        assert a.cache.stats["invalid"] == 1 and a.cache.stats["malformed"] == 2
    finally:
        await a.stop()
