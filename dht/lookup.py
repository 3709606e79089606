"""Verified record lookup: a Kademlia value crawl that trusts no answer it cannot verify.

kademlia's ``ValueSpiderCrawl`` returns the most common value of the first round
that found any, unverified, so one lying node can answer a lookup. ``RecordCrawl``
instead checks every value with ``dht.records.record_for_key`` (signature, key =
signer's DHT id, expiry); invalid answers are counted and ignored and the crawl
goes on. After the first round that yields a valid record it asks up to
``alpha`` more of the closest unasked nodes (a confirmation round), then keeps
the highest ``seq`` among everything valid it saw, so a replayed older record
does not win just by answering first. It also counts rounds (hops) and queries.

Must not import node.daemon, the CLI or any transport.
"""

from __future__ import annotations

import logging
from typing import Any

from kademlia.crawling import SpiderCrawl
from kademlia.node import Node, NodeHeap
from kademlia.utils import gather_dict

from dht.protocol import HardenedProtocol
from dht.records import record_for_key
from node.contact import ContactRecord
from node.errors import ProtocolError

log = logging.getLogger(__name__)


class RecordCrawl(SpiderCrawl):  # type: ignore[misc]
    def __init__(self, protocol: HardenedProtocol, node: Node, peers: list[Node], ksize: int,
                 alpha: int) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.protocol: HardenedProtocol = protocol
        self.nearest_without_value = NodeHeap(self.node, 1)
        self.last_ids_crawled: list[bytes] = []
        self.hops = 0
        self.queries = 0
        # (record, encoded value, node that answered)
        self.found: list[tuple[ContactRecord, bytes, Node]] = []

    async def find(self) -> list[tuple[ContactRecord, bytes, Node]]:
        """Crawl until a valid record is found (plus a confirmation round) or all were asked."""
        while True:
            asked = await self._round(self.alpha)
            if self.found:
                # confirmation round (not a hop): alpha more of the closest, for a fresher seq
                await self._round(self.alpha, confirm=True)
                return self.found
            if asked == 0 or self.nearest.have_contacted_all():
                return self.found

    async def _round(self, count: int, *, confirm: bool = False) -> int:
        if not confirm and self.nearest.get_ids() == self.last_ids_crawled:
            count = len(self.nearest)  # no progress: ask everyone not yet asked
        self.last_ids_crawled = self.nearest.get_ids()
        calls: dict[bytes, Any] = {}
        for peer in self.nearest.get_uncontacted()[:count]:
            calls[peer.id] = self.protocol.call_find_value(peer, self.node)
            self.nearest.mark_contacted(peer)
        if not calls:
            return 0
        self.hops += 0 if confirm else 1
        self.queries += len(calls)
        responses = await gather_dict(calls)
        dead = []
        for peer_id, (ok, reply) in responses.items():
            peer = self.nearest.get_node(peer_id)
            if not ok:
                dead.append(peer_id)
            elif isinstance(reply, dict):
                try:
                    record = record_for_key(self.node.id, reply["value"])
                except ProtocolError as exc:
                    self.protocol.stats["rejected_records"] += 1
                    log.info("ignored an invalid record from %s: %s", peer, exc)
                    continue
                self.found.append((record, reply["value"], peer))
            else:
                if peer is not None:
                    self.nearest_without_value.push(peer)
                self.nearest.push([Node(*t) for t in reply])
        self.nearest.remove(dead)
        return len(calls)

    async def _nodes_found(self, responses: dict[bytes, Any]) -> Any:
        raise NotImplementedError("RecordCrawl drives its own rounds")
