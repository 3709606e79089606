"""DHT discovery: join, publish our record, learn contacts' records, look peers up.

``DhtDiscovery.join()`` retries (0.5 s doubling to 10 s) until some contact from
the manual ``--bootstrap-peer`` list, the peer cache or the bootstrap servers'
answers replies, then stores our record and runs the discover loop: every
DHT_DISCOVER_S it looks up the records of routing-table contacts not yet in the
peer book (source ``dht``), and every STUN_INTERVAL_S asks a few contacts where
they see our DHT socket (the ``stun`` RPC), feeding ObservedAddresses.
``locate()`` is the peer book first, then a DHT lookup.

The DHT node, the peer book, the cache and the record are injected (fakes in
tests/unit/test_discovery_services.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from node.contact import ContactRecord
from node.discovery.observed import ObservedAddresses
from node.errors import P2PError
from node.identity import PeerId
from node.peerbook import PeerBook

log = logging.getLogger("p2pfs.discovery")

DHT_DISCOVER_S = 5.0
DHT_DISCOVER_BATCH = 32
JOIN_RETRY_FIRST_S = 0.5
JOIN_RETRY_MAX_S = 10.0
STUN_INTERVAL_S = 300.0
STUN_PEERS = 3


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise P2PError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Dht(Protocol):
    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int: ...

    async def set_record(self, record: ContactRecord) -> int: ...

    async def lookup(self, peer_id: PeerId) -> Any: ...

    async def lookup_id(self, key: bytes) -> Any: ...

    async def stun(self, addr: tuple[str, int]) -> tuple[str, int] | None: ...

    def contact_ids(self) -> list[tuple[bytes, str, int]]: ...


class AddressCache(Protocol):
    def dht_addresses(self) -> list[tuple[str, int]]: ...


class DhtDiscovery:
    def __init__(self, dht: Dht, book: PeerBook, record: Callable[[], ContactRecord], *,
                 manual_peers: list[str], cache: AddressCache,
                 bootstrap_addrs: Callable[[], list[tuple[str, int]]] = list,
                 observed: ObservedAddresses | None = None,
                 on_observed: Callable[[], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.dht = dht
        self.book = book
        self.record = record
        self.cache = cache
        self.bootstrap_addrs = bootstrap_addrs
        self.observed = observed
        self.on_observed = on_observed
        self._sleep = sleep
        self._clock = clock
        self.joined = False
        self.manual: list[tuple[str, int]] = []
        for text in manual_peers:
            try:
                self.manual.append(parse_hostport(text))
            except P2PError as exc:
                log.warning("ignoring --bootstrap-peer: %s", exc)

    async def run(self) -> None:
        await self.join()
        await self.discover_loop()

    async def join(self) -> None:
        """Join the DHT from manual peers, the cache and bootstrap answers; publish."""
        delay = JOIN_RETRY_FIRST_S
        while True:
            addrs = self.manual + self.cache.dht_addresses() + self.bootstrap_addrs()
            if addrs:
                answered = await self.dht.bootstrap(addrs)
                if answered:
                    stored = await self.dht.set_record(self.record())
                    self.joined = True
                    log.info("joined the DHT through %d contact(s); record stored on %d node(s)",
                             answered, stored)
                    return
            await self._sleep(delay)
            delay = min(delay * 2, JOIN_RETRY_MAX_S)

    async def publish(self, record: ContactRecord) -> None:
        """Our record changed: store it again (only once joined; join() stores it)."""
        if self.joined:
            with contextlib.suppress(P2PError, OSError):
                await self.dht.set_record(record)

    async def discover_loop(self) -> None:
        """Learn the records of the DHT's routing-table contacts, so peers found only
        through the DHT (the bootstrap server gone, or never used) appear in `node peers`."""
        next_stun = 0.0
        while True:
            await self.discover_once()
            if self.observed is not None and self._clock() >= next_stun:
                await self.stun_once()
                next_stun = self._clock() + STUN_INTERVAL_S
            await self._sleep(DHT_DISCOVER_S)

    async def discover_once(self) -> None:
        known = {pid.dht_id for pid in self.book.entries()}
        unknown = [cid for cid, _ip, _port in self.dht.contact_ids() if cid not in known]
        for cid in unknown[:DHT_DISCOVER_BATCH]:
            with contextlib.suppress(P2PError, OSError, asyncio.TimeoutError):
                found = await self.dht.lookup_id(cid)
                if found is not None:
                    self.book.add(found.record, "dht")

    async def stun_once(self) -> int:
        """Ask up to STUN_PEERS contacts (distinct IPs) where they see us; returns answers."""
        assert self.observed is not None
        by_ip: dict[str, tuple[str, int]] = {}
        for _cid, ip, port in self.dht.contact_ids():
            by_ip.setdefault(ip, (ip, port))
        chosen = random.sample(list(by_ip.values()), min(STUN_PEERS, len(by_ip)))
        answers = await asyncio.gather(*(self.dht.stun(a) for a in chosen),
                                       return_exceptions=True)
        got = 0
        for addr, seen in zip(chosen, answers, strict=True):
            if isinstance(seen, tuple):
                self.observed.report("dht", addr[0], seen[0], seen[1], self._clock())
                got += 1
        if got and self.on_observed is not None:
            self.on_observed()
        return got

    async def locate(self, peer: PeerId) -> ContactRecord | None:
        record = self.book.get(peer)
        if record is not None:
            return record
        found = await self.dht.lookup(peer)
        if found is not None:
            self.book.add(found.record, "dht")
            return found.record  # type: ignore[no-any-return]
        return None
