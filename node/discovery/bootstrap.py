"""Bootstrap registration: register our record with each bootstrap server, poll its list.

One loop per server URL: register (and re-register before the TTL), poll the
online list in between so peers that joined after us show up quickly, mark
peers online/offline in the peer book with source ``bootstrap``, and report
the server's ``observed`` source address. A failure backs off exponentially
(to REGISTER_BACKOFF_MAX_S) and marks the server's peers offline.

Dependencies are injected (a client factory, the peer book, the record getter,
``sleep``), so the loop runs against fakes in tests.
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
from node.identity import Identity
from node.peerbook import PeerBook

log = logging.getLogger("p2pfs.discovery")

REGISTER_BACKOFF_MAX_S = 60.0
# how often the online list is fetched from each bootstrap server between registrations
PEER_POLL_S = 5.0


class Client(Protocol):
    observed: tuple[str, int] | None

    async def register(self, record: ContactRecord) -> list[ContactRecord]: ...

    async def list_peers(self, limit: int = ...) -> list[dict[str, Any]]: ...

    async def unregister(self, identity: Identity) -> None: ...

    async def close(self) -> None: ...


def _default_client(url: str) -> Client:
    from bootstrap.client import BootstrapClient

    return BootstrapClient(url)


class BootstrapRegistration:
    def __init__(self, identity: Identity, book: PeerBook, record: Callable[[], ContactRecord],
                 *, interval_s: float, observed: ObservedAddresses | None = None,
                 on_observed: Callable[[], None] | None = None,
                 client_factory: Callable[[str], Client] = _default_client,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = identity
        self.book = book
        self.record = record
        self.interval_s = interval_s
        self.observed = observed
        self.on_observed = on_observed
        self._client_factory = client_factory
        self._sleep = sleep
        self._clock = clock
        self.clients: list[Client] = []
        self._urls: list[str] = []
        self._reregister: set[str] = set()

    def reregister_soon(self) -> None:
        """Our record changed: every loop registers it on its next round."""
        self._reregister.update(self._urls)

    async def run(self, url: str) -> None:
        """Register (and re-register before the TTL) with one bootstrap server, and poll
        its online list in between so peers that joined after us show up quickly."""
        client = self._client_factory(url)
        self.clients.append(client)
        self._urls.append(url)
        backoff = 1.0
        registered_at: float | None = None
        while True:
            try:
                due = registered_at is None or self._clock() - registered_at >= self.interval_s
                if due or url in self._reregister:
                    self._reregister.discard(url)
                    records = await client.register(self.record())
                    registered_at = self._clock()
                    self._observed(url, client.observed)
                else:
                    records = [e["record"] for e in await client.list_peers()
                               if e.get("record") is not None
                               and e["record"].peer_id != self.identity.peer_id]
                backoff = 1.0
                self.online(records)
                delay = min(PEER_POLL_S, self.interval_s)
            except P2PError as exc:
                log.warning("%s; retrying in %.0f s", exc, backoff)
                self.book.forget_source("bootstrap")
                registered_at = None
                delay = backoff
                backoff = min(backoff * 2, REGISTER_BACKOFF_MAX_S)
            await self._sleep(delay * random.uniform(0.9, 1.1))

    def _observed(self, url: str, seen: tuple[str, int] | None) -> None:
        if seen is None or self.observed is None:
            return
        self.observed.report("bootstrap", url, seen[0], seen[1], time.time())
        if self.on_observed is not None:
            self.on_observed()

    def online(self, records: list[ContactRecord]) -> None:
        seen = {r.peer_id for r in records}
        for entry_id in list(self.book.entries()):
            self.book.set_online(entry_id, "bootstrap", entry_id in seen)
        for record in records:
            self.book.add(record, "bootstrap")
            self.book.set_online(record.peer_id, "bootstrap", True)

    def dht_addrs(self) -> list[tuple[str, int]]:
        """The DHT endpoints of peers a bootstrap server told us about."""
        out = []
        for entry in self.book.entries().values():
            ep = entry.record.endpoint("dht")
            if ep is not None and "bootstrap" in entry.sources:
                out.append(ep)
        return out

    async def unregister_all(self) -> None:
        await asyncio.gather(*(c.unregister(self.identity) for c in self.clients),
                             return_exceptions=True)

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
