"""DhtNode: this node's presence in the Kademlia DHT, publishing and finding signed contact records.

``DhtNode`` wraps ``DhtServer``, a ``kademlia.network.Server`` subclass whose
protocol is ``dht.protocol.HardenedProtocol`` and whose storage is
``dht.storage.RecordStorage``. Library defects fixed here (see also protocol.py):

* STATE: ``save_state``/``load_state`` serialise with the stdlib's unsafe object
  serialiser; they are disabled (raise), the SQLite ``PeerCache`` replaces them.
* BIND: ``listen()`` defaults to 0.0.0.0; ours has no default, DhtNode binds the
  configured host.
* IDS: node ids are random; ours is ``identity.peer_id.dht_id``. Routing uses
  unverified ids, but only verified records leave ``lookup()``; ``get()``/``set()``
  of arbitrary values are disabled.
* SET: ``set_digest`` raised ``ValueError: max() iterable argument is empty``
  when every contact was dead; ours returns 0 stored.
* TASKS: the hourly table refresh ran as an untracked task; ours is tracked and
  cancelled on stop.
* CRAWLS: joining and publishing use ``dht.lookup.NodeCrawl`` and lookups
  ``RecordCrawl``, which wait for no dead contact (issue 7; see dht/lookup.py).

The node publishes its own record under its DHT id, republishes it every
``republish_s`` (re-signing with seq + 1 before it expires), verifies every
looked-up record, and feeds verified records into the peer cache.

Imports dht.*, node.contact, node.identity, node.errors; never node.daemon or the CLI.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from dht.lookup import NodeCrawl, RecordCrawl
from dht.peercache import PeerCache
from dht.protocol import RPC_TIMEOUT_S, HardenedProtocol, new_stats
from dht.storage import RecordStorage
from node.contact import ContactRecord
from node.errors import P2PError, ProtocolError, bind_errors
from node.identity import Identity, PeerId

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 3600.0
RESOLVE_TIMEOUT_S = 2.0
MAX_BOOTSTRAP_ADDRS = 256
# re-sign our record when less than this (plus two republish periods) is left
RESIGN_MARGIN_S = 60.0


@dataclass(frozen=True)
class LookupResult:
    record: ContactRecord
    hops: int
    queries: int
    elapsed_s: float


class DhtServer(Server):  # type: ignore[misc]
    protocol_class = HardenedProtocol

    def __init__(self, node_id: bytes, *, ksize: int, alpha: int, storage: RecordStorage,
                 stats: dict[str, int], rpc_timeout_s: float) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        # the base class does `storage or ForgetfulStorage()`, and an empty storage is falsy
        self.storage = storage
        self.stats = stats
        self.rpc_timeout_s = rpc_timeout_s
        self.protocol: HardenedProtocol | None = None

    def _create_protocol(self) -> HardenedProtocol:
        return self.protocol_class(self.node, self.storage, self.ksize,
                                   rpc_timeout_s=self.rpc_timeout_s, stats=self.stats)

    # Fix BIND: no 0.0.0.0 default; the caller says where
    async def listen(self, port: int, interface: str) -> None:  # type: ignore[override]
        loop = asyncio.get_running_loop()
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port))
        self.refresh_table()

    # Fix TASKS: refresh runs as a tracked task
    def refresh_table(self, interval: float = REFRESH_INTERVAL_S) -> None:
        assert self.protocol is not None
        self.protocol.spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(interval, self.refresh_table)

    async def bootstrap_node(self, addr: tuple[str, int]) -> Node | None:
        assert self.protocol is not None
        ok, node_id = await self.protocol.ping(addr, self.node.id)
        if not ok or node_id == self.node.id:
            return None
        return Node(node_id, addr[0], addr[1])

    # Fix SET: stock code calls max() on an empty list when every contact is dead
    async def set_digest(self, dkey: bytes, value: bytes) -> int:  # type: ignore[override]
        """Store `value` on the k nodes closest to `dkey`; returns how many accepted it."""
        assert self.protocol is not None
        node = Node(dkey)
        nearest = self.protocol.router.find_neighbors(node)
        if not nearest:
            return 0
        nodes = await NodeCrawl(self.protocol, node, nearest, self.ksize,
                                      self.alpha).find()
        if not nodes:
            log.warning("no DHT contact answered; %s not published", dkey.hex()[:12])
            return 0
        results = await asyncio.gather(*(self.protocol.call_store(n, dkey, value)
                                         for n in nodes))
        return sum(1 for ok, reply in results if ok and reply is True)

    # Fix STATE: never serialise state with the unsafe stdlib serialiser
    def save_state(self, fname: Any) -> None:
        raise P2PError("DHT state is not saved this way; the peer cache keeps contacts")

    @classmethod
    async def load_state(cls, fname: Any, port: int, interface: str = "") -> DhtServer:
        raise P2PError("DHT state is not loaded this way; bootstrap from the peer cache")

    def save_state_regularly(self, fname: Any, frequency: int = 600) -> None:
        raise P2PError("DHT state is not saved this way; the peer cache keeps contacts")

    # Fix IDS: only verified records leave the DHT (DhtNode.lookup); no raw values
    async def get(self, key: Any) -> Any:
        raise P2PError("use DhtNode.lookup(): raw DHT values are not trusted")

    async def set(self, key: Any, value: Any) -> Any:
        raise P2PError("use DhtNode.set_record(): only signed contact records are stored")


class DhtNode:
    def __init__(self, identity: Identity, *, host: str, port: int,
                 cache: PeerCache | None = None, ksize: int = 20, alpha: int = 3,
                 republish_s: float = 600.0, rpc_timeout_s: float = RPC_TIMEOUT_S,
                 storage: RecordStorage | None = None) -> None:
        self.identity = identity
        self.host = host
        self.port = port
        self.cache = cache
        self.republish_s = republish_s
        self.stats: dict[str, int] = new_stats()
        self.storage = storage if storage is not None else RecordStorage()
        self.server = DhtServer(identity.peer_id.dht_id, ksize=ksize, alpha=alpha,
                                storage=self.storage, stats=self.stats,
                                rpc_timeout_s=rpc_timeout_s)
        self.record: ContactRecord | None = None
        self._republish_task: asyncio.Task[None] | None = None
        self._publish_lock = asyncio.Lock()
        self._started = False

    @property
    def dht_id(self) -> bytes:
        return self.identity.peer_id.dht_id

    @property
    def protocol(self) -> HardenedProtocol:
        if self.server.protocol is None:
            raise P2PError("the DHT node is not started")
        return self.server.protocol

    async def start(self) -> int:
        """Bind UDP on host:port (port 0 = any free port); returns the bound port."""
        with bind_errors("dht", self.host, self.port):
            await self.server.listen(self.port, self.host)
        self.protocol.on_stored = self._on_stored
        self.port = self.server.transport.get_extra_info("sockname")[1]
        self._started = True
        log.info("DHT listening on %s:%d as %s", self.host, self.port, self.dht_id.hex()[:12])
        return self.port

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        """Join through `addrs` plus the peer cache's DHT addresses; returns how many answered."""
        candidates = list(addrs)
        if self.cache is not None:
            candidates += self.cache.dht_addresses()
        resolved: list[tuple[str, int]] = []
        seen = {(self.host, self.port)}
        for host, port in candidates[:MAX_BOOTSTRAP_ADDRS]:
            ip = await _resolve(host, port)
            if ip is None or (ip, port) in seen:
                continue
            seen.add((ip, port))
            resolved.append((ip, port))
        if not resolved:
            return 0
        pinged = await asyncio.gather(*(self.server.bootstrap_node(a) for a in resolved))
        nodes = [n for n in pinged if n is not None]
        if nodes:
            await NodeCrawl(self.protocol, self.server.node, nodes, self.server.ksize,
                                  self.server.alpha).find()
        return len(nodes)

    async def set_record(self, record: ContactRecord) -> int:
        """Publish our own signed record; returns how many nodes stored it (0 if none answered)."""
        self.protocol  # noqa: B018  (raises P2PError when the node is not started)
        if record.peer_id != self.identity.peer_id:
            raise ProtocolError("set_record publishes only this node's own record")
        record.verify()
        if self.record is not None and record.seq < self.record.seq:
            raise ProtocolError(f"record seq {record.seq} is older than the published "
                                f"{self.record.seq}")
        self.record = record
        if self.cache is not None:
            self.cache.add(record, "manual")
        if self._republish_task is None and self._started:
            self._republish_task = asyncio.create_task(self._republish_loop())
        return await self._publish()

    async def _publish(self) -> int:
        async with self._publish_lock:
            record = self.record
            if record is None:
                return 0
            value = record.encode()
            self.storage.put(self.dht_id, value)
            return int(await self.server.set_digest(self.dht_id, value))

    async def _republish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.republish_s)
            record = self.record
            if record is None:
                continue
            left_s = record.expires - time.time()
            if left_s < 2 * self.republish_s + RESIGN_MARGIN_S:
                ttl = record.expires - record.timestamp
                record = ContactRecord.create(self.identity, record.hosts, record.ports,
                                              record.seq + 1, ttl_s=ttl,
                                              observed=record.observed)
                self.record = record
            try:
                stored = await self._publish()
            except (ProtocolError, OSError) as exc:
                log.warning("republishing our DHT record failed: %s", exc)
            else:
                log.debug("republished DHT record seq %d on %d nodes", record.seq, stored)

    async def lookup(self, peer_id: PeerId) -> LookupResult | None:
        """Find `peer_id`'s current record through the DHT; None when nobody has a valid one."""
        if peer_id == self.identity.peer_id and self.record is not None:
            return LookupResult(self.record, 0, 0, 0.0)
        found = await self.lookup_id(peer_id.dht_id)
        return found if found is not None and found.record.peer_id == peer_id else None

    async def lookup_id(self, key: bytes) -> LookupResult | None:
        """Find the record stored under a DHT id (e.g. a routing-table contact's id).

        Records are only accepted under the DHT id of their own signer, so whatever
        comes back is the record of the peer whose id this is.
        """
        t0 = time.perf_counter()
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        local = self.storage.get_record(key)
        if not nearest:
            return LookupResult(local, 0, 0, time.perf_counter() - t0) if local else None
        crawl = RecordCrawl(self.protocol, target, nearest, self.server.ksize,
                            self.server.alpha)
        found = await crawl.find()
        candidates = [rec for rec, _, _ in found]
        if local is not None:
            candidates.append(local)
        if not candidates:
            return None
        best = max(candidates, key=lambda r: r.seq)
        value = best.encode()
        # repair: give the best record to the closest node that lacked it and to stale holders
        repair = [n for rec, _, n in found if rec.seq < best.seq and n is not None]
        missing = crawl.nearest_without_value.popleft()
        if missing is not None:
            repair.append(missing)
        for n in repair:
            self.protocol.spawn(self.protocol.call_store(n, key, value))
        self._remember(best)
        return LookupResult(best, crawl.hops, crawl.queries, time.perf_counter() - t0)

    async def stun(self, addr: tuple[str, int]) -> tuple[str, int] | None:
        """Where the DHT peer at `addr` sees our DHT socket (host, port); None if silent."""
        return await self.protocol.stun(addr)

    def contacts(self) -> list[tuple[str, int]]:
        return [(ip, port) for _, ip, port in self.contact_ids()]

    def contact_ids(self) -> list[tuple[bytes, str, int]]:
        """Routing-table contacts as (DHT id, ip, port)."""
        if self.server.protocol is None:
            return []
        return [(n.id, n.ip, n.port) for b in self.protocol.router.buckets for n in b.get_nodes()]

    async def stop(self) -> None:
        if self._republish_task is not None:
            self._republish_task.cancel()
            await asyncio.gather(self._republish_task, return_exceptions=True)
            self._republish_task = None
        if self.server.protocol is not None:
            await self.server.protocol.close()
        self.server.stop()
        self._started = False

    # -- peer cache -------------------------------------------------------------
    def _remember(self, record: ContactRecord) -> None:
        if self.cache is None or record.peer_id == self.identity.peer_id:
            return
        try:
            self.cache.add(record, "dht")
        except ProtocolError as exc:  # verified already; only a clock edge gets here
            log.debug("peer cache refused %s: %s", record.peer_id.short, exc)

    def _on_stored(self, key: bytes) -> None:
        record = self.storage.get_record(key)
        if record is not None:
            self._remember(record)


async def _resolve(host: str, port: int) -> str | None:
    """An IP literal for `host` (kademlia needs one), or None when it does not resolve."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM),
            RESOLVE_TIMEOUT_S)
    except (TimeoutError, OSError):
        return None
    return str(infos[0][4][0]) if infos else None
