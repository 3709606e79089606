"""Iterative lookups that trust no answer they cannot verify and wait for no dead contact.

kademlia's crawls ask ``alpha`` contacts per round and wait for the whole round,
so every contact that never answers costs a full RPC timeout (2 s), once per
round (issue 7: 100 fake contacts made a lookup take 14 s). ``Crawl`` instead
keeps ``alpha`` queries in flight and drives them one answer at a time:

* STALL: a contact that has not answered within ``protocol.stall_timeout_s()``
  (srtt + 4 rttvar, 50 ms .. 1 s) stops counting against ``alpha`` and drops out
  of the k-closest window, so the lookup goes on with others at once; its answer
  is still used if it comes (as rust-libp2p's ``ClosestPeersIter`` treats
  unresponsive peers). Only when nothing else is left does the lookup wait for
  stalled queries, up to their RPC timeout.
* FAILED LAST: contacts that failed to answer us recently
  (``protocol.failed_recently``) rank after every other candidate, so they are
  asked only when nobody else is left in the window.
* PROVEN FIRST: within the k-closest window (chosen by distance alone, so the
  lookup still converges), contacts that answered a lookup query of ours
  before (``protocol.answered_lookups``) are asked before contacts that only
  answered a ping: a fake that answers pings and nothing else costs a stall
  only when nobody proven is left to ask.
* REFILL: when every candidate failed or stalled, the next-closest contacts of
  our own routing table join the lookup (kademlia gave up after its first k).
* BOUNDED: at most ``MAX_LOOKUP_QUERIES`` queries per lookup, whatever the
  answers contain.

``RecordCrawl`` (find_value) checks every value with
``dht.records.record_for_key`` (signature, key = signer's DHT id, expiry):
kademlia's ``ValueSpiderCrawl`` returned the most common value of the first
round, unverified, so one lying node could answer a lookup. Invalid answers are
counted and ignored. After the first valid record it asks up to ``alpha`` more
of the closest unasked contacts (confirmation) and waits for them only until
they answer or stall; the caller keeps the highest ``seq``, so a replayed older
record does not win by answering first. ``NodeCrawl`` (find_node) returns the
k closest contacts that answered (joining, publishing).

``hops`` is the length of the referral chain to the contact that answered with
the record (the first contacts are hop 1); ``queries`` counts RPCs sent.

Must not import node.daemon, the CLI or any transport.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any

from kademlia.node import Node, NodeHeap

from dht.protocol import HardenedProtocol
from dht.records import record_for_key
from node.contact import ContactRecord
from node.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_LOOKUP_QUERIES = 100


class PeerState(enum.Enum):
    HEARD = "heard"          # known, not asked
    WAITING = "waiting"      # asked, within its stall timeout
    STALLED = "stalled"      # asked, slow: no longer holds a slot, answer still taken
    ANSWERED = "answered"
    FAILED = "failed"        # no answer within the RPC timeout


@dataclass(slots=True)
class LookupPeer:
    node: Node
    distance: int
    hop: int
    failed_before: bool
    proven: bool  # answered a lookup query of ours before
    state: PeerState = PeerState.HEARD
    stall_at: float = 0.0

    def rank(self) -> tuple[bool, int]:
        return (self.failed_before, self.distance)

    def ask_order(self) -> tuple[bool, bool, int]:
        return (self.failed_before, not self.proven, self.distance)


class Crawl:
    """One iterative lookup for `node`'s id, starting from `peers`."""

    method = "find_node"

    def __init__(self, protocol: HardenedProtocol, node: Node, peers: list[Node], ksize: int,
                 alpha: int, *, max_queries: int = MAX_LOOKUP_QUERIES) -> None:
        self.protocol = protocol
        self.node = node
        self.ksize = ksize
        self.alpha = alpha
        self.max_queries = max_queries
        self.peers: dict[bytes, LookupPeer] = {}
        self.hops = 0
        self.queries = 0
        self.stalls = 0
        self.asked: list[Node] = []  # in the order asked
        self._running: dict[asyncio.Future[Any], LookupPeer] = {}
        self._hear(peers, hop=1)

    # -- the candidate set -----------------------------------------------------------
    def _hear(self, nodes: list[Node], hop: int) -> None:
        for n in nodes:
            if n.id == self.protocol.source_node.id or n.id in self.peers:
                continue
            self.peers[n.id] = LookupPeer(n, n.distance_to(self.node), hop,
                                          self.protocol.failed_recently(n),
                                          self.protocol.answered_lookups(n))

    def window(self) -> list[LookupPeer]:
        """The k best candidates that are neither failed nor stalled, best first."""
        live = (p for p in self.peers.values()
                if p.state not in (PeerState.FAILED, PeerState.STALLED))
        return heapq.nsmallest(self.ksize, live, key=LookupPeer.rank)

    def _set_state(self, peer: LookupPeer, state: PeerState) -> None:
        log.debug("lookup %s: %s %s -> %s", self.node.id.hex()[:8], peer.node,
                  peer.state.value, state.value)
        peer.state = state

    # -- querying ----------------------------------------------------------------------
    def _ask(self, peer: LookupPeer) -> bool:
        coro = getattr(self.protocol, f"call_{self.method}")(peer.node, self.node)
        task = self.protocol.spawn(coro)
        if task is None:  # protocol closed
            return False
        self.queries += 1
        self.asked.append(peer.node)
        peer.stall_at = time.monotonic() + self.protocol.stall_timeout_s()
        self._set_state(peer, PeerState.WAITING)
        self._running[task] = peer
        return True

    def _waiting(self) -> int:
        return sum(1 for p in self._running.values() if p.state is PeerState.WAITING)

    def _launch(self, limit: int) -> int:
        """Ask up to `limit` of the best unasked candidates in the window.

        The window (which contacts count) is by distance; within it, contacts
        that answered lookups before are asked first.
        """
        started = 0
        for peer in sorted(self.window(), key=LookupPeer.ask_order):
            if started >= limit or self.queries >= self.max_queries:
                break
            if peer.state is PeerState.HEARD:
                if not self._ask(peer):
                    break
                started += 1
        return started

    async def _step(self) -> None:
        """Wait for the next answer or the next stall deadline, then take what came."""
        now = time.monotonic()
        deadlines = [p.stall_at for p in self._running.values() if p.state is PeerState.WAITING]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        done, _ = await asyncio.wait(list(self._running), timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            peer = self._running.pop(task)
            failed = task.cancelled() or task.exception() is not None
            ok, reply = (False, None) if failed else task.result()
            if not ok:
                self._set_state(peer, PeerState.FAILED)
            else:
                self._set_state(peer, PeerState.ANSWERED)
                self._answered(peer, reply)
        now = time.monotonic()
        for peer in self._running.values():
            if peer.state is PeerState.WAITING and now >= peer.stall_at:
                self._set_state(peer, PeerState.STALLED)
                self.stalls += 1
                self.protocol.stats["lookup_stalls"] += 1

    def _answered(self, peer: LookupPeer, reply: Any) -> None:
        self._hear([Node(*t) for t in reply], peer.hop + 1)

    def _done(self) -> bool:
        """Stop early (a value was found); also decides whether to launch more."""
        return False

    def _searching(self) -> bool:
        return True

    def _refill(self) -> bool:
        """Out of candidates: take the next-closest contacts from our own routing table."""
        known = len(self.peers)
        more = self.protocol.router.find_neighbors(self.node, k=known + self.ksize)
        self._hear(more, hop=1)
        return len(self.peers) > known

    async def _crawl(self) -> None:
        while not self._done():
            if self._searching():
                self._launch(self.alpha - self._waiting())
                if self._waiting() == 0 and self.queries < self.max_queries and self._refill():
                    continue
            if self._waiting() == 0:
                window = self.window()
                # the k closest live contacts all answered: stalled ones cannot change that;
                # out of queries: nobody a stalled answer names could be asked anyway
                if (not self._running or self.queries >= self.max_queries
                        or (len(window) >= self.ksize
                            and all(p.state is PeerState.ANSWERED for p in window))):
                    return
                # otherwise only stalled queries are left: wait for them (RPC timeout)
            await self._step()

    def closest_answered(self) -> list[Node]:
        answered = [p for p in self.peers.values() if p.state is PeerState.ANSWERED]
        return [p.node for p in heapq.nsmallest(self.ksize, answered, key=LookupPeer.rank)]


class NodeCrawl(Crawl):
    """find_node: the k closest contacts that answered."""

    async def find(self) -> list[Node]:
        await self._crawl()
        return self.closest_answered()


class RecordCrawl(Crawl):
    """find_value for a signed contact record; see the module docstring."""

    method = "find_value"

    def __init__(self, protocol: HardenedProtocol, node: Node, peers: list[Node], ksize: int,
                 alpha: int, *, max_queries: int = MAX_LOOKUP_QUERIES) -> None:
        super().__init__(protocol, node, peers, ksize, alpha, max_queries=max_queries)
        self.nearest_without_value = NodeHeap(self.node, 1)
        # (record, encoded value, node that answered)
        self.found: list[tuple[ContactRecord, bytes, Node]] = []
        self._confirming = False

    async def find(self) -> list[tuple[ContactRecord, bytes, Node]]:
        """Crawl until a valid record is found (plus confirmation) or nobody is left to ask."""
        await self._crawl()
        return self.found

    def _searching(self) -> bool:
        return not self.found

    def _done(self) -> bool:
        if not self.found:
            return False
        if not self._confirming:
            # confirmation: alpha more of the closest, for a fresher seq (not a hop)
            self._confirming = True
            self._launch(self.alpha)
        return self._waiting() == 0

    def _answered(self, peer: LookupPeer, reply: Any) -> None:
        if not isinstance(reply, dict):
            self.nearest_without_value.push(peer.node)
            super()._answered(peer, reply)
            return
        try:
            record = record_for_key(self.node.id, reply["value"])
        except ProtocolError as exc:
            self.protocol.stats["rejected_records"] += 1
            log.info("ignored an invalid record from %s: %s", peer.node, exc)
            return
        if not self.found:
            self.hops = peer.hop
        self.found.append((record, reply["value"], peer.node))
