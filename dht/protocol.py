"""Hardened Kademlia RPC protocol: kademlia 2.2.3 / rpcudp 5.0.1 made safe for open networks.

``HardenedProtocol`` subclasses ``kademlia.protocol.KademliaProtocol`` and replaces
rpcudp's datagram handling. Each fix names the defect it addresses:

* PARSE: rpcudp decodes every datagram in a task with an unbounded decoder and
  raises on garbage, truncated, oversize or wrong-arity input (unhandled task
  exceptions). Here ``parse_datagram`` (pure) checks size, kind, msgpack,
  method name, arity and every argument's type and length; anything else is
  dropped synchronously with ``stats["dropped_datagrams"]`` incremented.
* RESPONSES: replies are matched to the address the request went to and
  checked per RPC (a node id of 20 bytes, a bounded list of valid
  (id, ip, port) triples, ``{"value": bytes}``, a bool); a bad reply counts as
  no reply (``stats["bad_responses"]``).
* NO MAGIC RPCS: rpcudp's ``__getattr__`` turns any unknown attribute into a
  remote call; here unknown attributes raise AttributeError.
* STORE: ``rpc_store`` goes through ``RecordStorage.put`` (bytes only, bounded,
  valid signed record under its signer's DHT id, no lower seq), so one stored
  list can no longer poison every later ``get()``.
* JOIN COST: ``welcome_if_new`` looped over every stored key for every new
  sender id (4,000 spoofed stores ~ 35 s of CPU). Here it examines only the
  ``REPLICATE_WINDOW_KEYS`` keys nearest the new node, under a token-bucket
  rate limit on replication stores.
* DIGEST BUG: ``welcome_if_new`` built ``Node(digest(key))`` from a key that is
  already a digest, so replication on join targeted the wrong id. Here: ``Node(key)``.
* NEIGHBORS: ``find_neighbors`` returns the exact k closest contacts; the stock
  table traversal could return none at all (see ``HardenedRoutingTable``).
* TASKS: fire-and-forget tasks (replication stores, bucket-head pings) are
  tracked and cancelled on ``close()``, so stopping leaves nothing pending.
* ADMISSION: kademlia put the node id of every request's sender into the
  routing table, so one fake id that never answers raised a lookup from 1 ms to
  2 s, 100 fake ids to 14 s (issue 7). Here a sender we do not know yet only
  earns a verification ping (one at a time per address, at most
  ``MAX_PENDING_VERIFICATIONS`` at once, not again soon after it failed); a
  contact enters the table only when it answered a request of ours, with the id
  it claimed (``stats["verified_contacts"]`` / ``["unverified_contacts"]``).
* EVICTION: a full bucket keeps its least-recently-seen contact if that one
  answers a ping and only then moves it to the tail (the stock code never
  refreshed a contact that answered, so it pinged the same head forever); the
  newcomer waits in the replacement cache and replaces the head only if the
  head fails (paper section 2.2). An answer from another address does not
  move a known id.
* FAILED LAST: contacts that failed to answer are remembered (bounded), so
  lookups ask them only after everyone else (``failed_recently``), and the RTT
  of answers is tracked so a lookup stops waiting for a slow contact after
  ``stall_timeout_s()`` while its answer is still taken if it comes (dht.lookup).
  Contacts that answered a lookup query of ours, not just a ping, are
  remembered too (``answered_lookups``): among equally eligible candidates a
  lookup asks them first, so fakes that answer pings only are asked later.

Must not import node.daemon, the CLI or any transport.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from dht.records import DHT_KEY_LEN_BYTES, MAX_VALUE_BYTES
from dht.storage import RecordStorage, StoreOutcome
from node.errors import ProtocolError
from node.wire import packb, unpackb

log = logging.getLogger(__name__)

MSG_ID_LEN_BYTES = 20
HEADER_LEN_BYTES = 1 + MSG_ID_LEN_BYTES
KIND_REQUEST = 0
KIND_RESPONSE = 1
# rpcudp refuses to send more than 8 KiB of payload; nothing valid is larger
MAX_PAYLOAD_BYTES = 8192
MAX_DATAGRAM_BYTES = HEADER_LEN_BYTES + MAX_PAYLOAD_BYTES
MAX_NODES_PER_REPLY = 64
MAX_IP_LEN = 45
RPC_TIMEOUT_S = 2.0
REPLICATE_WINDOW_KEYS = 16
REPLICATE_STORES_PER_S = 200.0
REPLICATE_BURST_STORES = 400.0
# admission: verification pings for senders we do not know yet
MAX_PENDING_VERIFICATIONS = 64
# ids that failed to answer: remembered this long, at most this many
FAILED_MEMORY_S = 600.0
MAX_FAILED_REMEMBERED = 4096
# contacts that answered a find_node/find_value of ours (not just a ping), at most this many
MAX_USEFUL_REMEMBERED = 4096
# a lookup stops waiting for a contact after srtt + 4 rttvar (RFC 6298), clamped;
# sampled from find_node/find_value answers only: pings are what a flood of fake
# senders makes us send (and what they can answer as slowly as they like)
STALL_MIN_S = 0.05
STALL_MAX_S = 0.5
RTT_SAMPLED_METHODS = frozenset({"find_node", "find_value"})
INITIAL_RTT_S = 0.1

STAT_KEYS = (
    "dropped_datagrams", "bad_responses", "unmatched_responses", "rpc_timeouts",
    "handler_errors", "accepted_stores", "rejected_stores", "stale_stores", "full_stores",
    "rejected_records", "replications", "replications_skipped",
    "verified_contacts", "unverified_contacts", "verifications_skipped",
    "lookup_stalls",
)


def new_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


# ---------------------------------------------------------------------------
# pure datagram parsing


@dataclass(frozen=True)
class Request:
    msg_id: bytes
    method: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Response:
    msg_id: bytes
    value: Any


def _dht_id(v: Any) -> bytes:
    if not isinstance(v, bytes) or len(v) != DHT_KEY_LEN_BYTES:
        raise ProtocolError(f"expected a {DHT_KEY_LEN_BYTES}-byte id")
    return v


def _value(v: Any) -> bytes:
    if not isinstance(v, bytes) or len(v) > MAX_VALUE_BYTES:
        raise ProtocolError(f"a stored value is bytes of at most {MAX_VALUE_BYTES}")
    return v


REQUEST_SPECS: dict[str, tuple[Callable[[Any], Any], ...]] = {
    "ping": (_dht_id,),
    "store": (_dht_id, _dht_id, _value),
    "find_node": (_dht_id, _dht_id),
    "find_value": (_dht_id, _dht_id),
    # ours, not the library's: "where do you see me?" (the caller's source address)
    "stun": (_dht_id,),
}


def parse_datagram(data: bytes) -> Request | Response:
    """``kind(1) || msg_id(20) || msgpack`` -> Request/Response; ProtocolError on anything else."""
    if len(data) <= HEADER_LEN_BYTES:
        raise ProtocolError("datagram too short")
    if len(data) > MAX_DATAGRAM_BYTES:
        raise ProtocolError("datagram too large")
    kind, msg_id = data[0], bytes(data[1:HEADER_LEN_BYTES])
    if kind not in (KIND_REQUEST, KIND_RESPONSE):
        raise ProtocolError(f"unknown datagram kind {kind}")
    body = unpackb(bytes(data[HEADER_LEN_BYTES:]), max_bytes=MAX_PAYLOAD_BYTES)
    if kind == KIND_RESPONSE:
        return Response(msg_id, body)
    if not isinstance(body, list) or len(body) != 2:
        raise ProtocolError("a request is [method, args]")
    method, args = body
    if not isinstance(method, str) or method not in REQUEST_SPECS:
        raise ProtocolError(f"unknown RPC {str(method)[:32]!r}")
    spec = REQUEST_SPECS[method]
    if not isinstance(args, list) or len(args) != len(spec):
        raise ProtocolError(f"{method}: expected {len(spec)} arguments")
    return Request(msg_id, method, tuple(check(a) for check, a in zip(spec, args, strict=True)))


def check_node_list(value: Any) -> list[tuple[bytes, str, int]]:
    """A find_node reply: a bounded list of (20-byte id, IP literal, port)."""
    if not isinstance(value, list) or len(value) > MAX_NODES_PER_REPLY:
        raise ProtocolError("a node list is a list of at most "
                            f"{MAX_NODES_PER_REPLY} entries")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError("a node entry is [id, ip, port]")
        nid, ip, port = item
        _dht_id(nid)
        if not isinstance(ip, str) or len(ip) > MAX_IP_LEN:
            raise ProtocolError("a node entry's ip is text")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ProtocolError("a node entry's ip is not an IP address") from None
        if type(port) is not int or not 0 < port <= 65535:
            raise ProtocolError("a node entry's port is out of range")
        out.append((nid, ip, port))
    return out


def check_find_value_reply(value: Any) -> dict[str, bytes] | list[tuple[bytes, str, int]]:
    if isinstance(value, dict):
        if set(value) != {"value"}:
            raise ProtocolError("a find_value reply is {'value': bytes}")
        return {"value": _value(value["value"])}
    return check_node_list(value)


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError("a store reply is a bool")
    return value


def check_stun_reply(value: Any) -> tuple[str, int]:
    """A stun reply: [IP literal, port], the source address the peer saw."""
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError("a stun reply is [ip, port]")
    ip, port = value
    if not isinstance(ip, str) or len(ip) > MAX_IP_LEN:
        raise ProtocolError("a stun reply's ip is text")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise ProtocolError("a stun reply's ip is not an IP address") from None
    if type(port) is not int or not 0 < port <= 65535:
        raise ProtocolError("a stun reply's port is out of range")
    return ip, port


REPLY_CHECKS: dict[str, Callable[[Any], Any]] = {
    "stun": check_stun_reply,
    "ping": _dht_id,
    "store": _check_bool,
    "find_node": check_node_list,
    "find_value": check_find_value_reply,
}


# ---------------------------------------------------------------------------
# the asyncio protocol


class HardenedRoutingTable(RoutingTable):  # type: ignore[misc]
    """Routing table fixes.

    * TASKS: the stock table fires `ensure_future(call_ping(...))` untracked; ours is tracked.
    * NEIGHBORS: the stock `TableTraverser` stops as soon as the side it alternates to
      is exhausted, so `find_neighbors` could return [] (or far nodes) with a table
      full of contacts, and lookups failed (~0.2 % at N = 200). Ours returns the
      exact k closest contacts (the table holds at most a few thousand).
    * EVICTION: see the module docstring; `touch` moves a contact that answered to
      its bucket's tail, so the head really is the least recently seen.
    """

    def contains(self, node: Node) -> bool:
        return node.id in self.buckets[self.get_bucket_for(node)].nodes

    def knows(self, node: Node) -> bool:
        """A contact, or verified and waiting in its bucket's replacement cache."""
        bucket = self.buckets[self.get_bucket_for(node)]
        return node.id in bucket.nodes or node.id in bucket.replacement_nodes

    def remove_contact(self, node: Node) -> None:
        # a silent address says nothing about the same id known at another address
        # (a liar can list a real id with a bogus address)
        known = self.buckets[self.get_bucket_for(node)].nodes.get(node.id)
        if known is None or known.same_home_as(node):
            super().remove_contact(node)

    def touch(self, node: Node) -> None:
        """`node` answered us: it becomes its bucket's most recently seen contact."""
        bucket = self.buckets[self.get_bucket_for(node)]
        known = bucket.nodes.get(node.id)
        # an answer from another address proves nothing about the known contact
        if known is not None and known.same_home_as(node):
            bucket.nodes.move_to_end(node.id)
            bucket.touch_last_updated()

    def find_neighbors(self, node: Node, k: int | None = None,
                       exclude: Node | None = None) -> list[Node]:
        k = k or self.ksize
        candidates = (n for b in self.buckets for n in b.nodes.values()
                      if n.id != node.id and (exclude is None or not n.same_home_as(exclude)))
        return heapq.nsmallest(k, candidates, key=node.distance_to)

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            # the newcomer waits in the replacement cache; it replaces the head only
            # if the head fails this ping (remove_node promotes the newest replacement)
            self.protocol.check_head(bucket.head())


RpcResult = tuple[bool, Any]


def _contact_key(node: Node) -> tuple[bytes, str, int]:
    return (node.id, node.ip, node.port)


class HardenedProtocol(KademliaProtocol):  # type: ignore[misc]
    def __init__(self, source_node: Node, storage: RecordStorage, ksize: int, *,
                 rpc_timeout_s: float = RPC_TIMEOUT_S, stats: dict[str, int] | None = None,
                 on_stored: Callable[[bytes], None] | None = None) -> None:
        super().__init__(source_node, storage, ksize)
        self.router = HardenedRoutingTable(self, ksize, source_node)
        self.storage: RecordStorage = storage
        self._wait_timeout = rpc_timeout_s
        self.stats = stats if stats is not None else new_stats()
        for k in STAT_KEYS:
            self.stats.setdefault(k, 0)
        self.on_stored = on_stored
        # msg_id -> (future, timeout handle, address, method, sent at (monotonic s))
        self._pending: dict[bytes, tuple[asyncio.Future[RpcResult], asyncio.TimerHandle,
                                         tuple[str, int], str, float]] = {}
        self._verifying: set[tuple[str, int]] = set()
        self._verifying_ids: set[bytes] = set()
        self._head_checks: set[bytes] = set()
        self._failed: OrderedDict[tuple[bytes, str, int], float] = OrderedDict()
        self._useful: OrderedDict[tuple[bytes, str, int], None] = OrderedDict()
        self.srtt_s: float | None = None
        self.rttvar_s = INITIAL_RTT_S / 2
        self._tasks: set[asyncio.Future[Any]] = set()
        self._tokens = REPLICATE_BURST_STORES
        self._tokens_at = time.monotonic()
        self._closed = False

    # Fix NO MAGIC RPCS: rpcudp makes every missing attribute a remote call
    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    # -- receiving ------------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # Fix PARSE: validate synchronously; never a task that can die unobserved
        try:
            msg = parse_datagram(data)
        except ProtocolError as exc:
            self.stats["dropped_datagrams"] += 1
            log.debug("dropped datagram from %s: %s", addr[:2], exc)
            return
        address = (addr[0], addr[1])
        if isinstance(msg, Response):
            self._accept_reply(msg, address)
        else:
            self._serve(msg, address)

    def _serve(self, req: Request, address: tuple[str, int]) -> None:
        if self._closed:
            return
        handler = getattr(self, f"rpc_{req.method}")
        try:
            result = handler(address, *req.args)
            payload = packb(result)
        except ProtocolError as exc:
            self.stats["dropped_datagrams"] += 1
            log.debug("refused %s from %s: %s", req.method, address, exc)
            return
        except Exception:  # a bug in a handler must not kill the server loop
            self.stats["handler_errors"] += 1
            log.exception("DHT handler %s failed for %s", req.method, address)
            return
        if self.transport is not None:
            self.transport.sendto(bytes([KIND_RESPONSE]) + req.msg_id + payload, address)

    def _accept_reply(self, msg: Response, address: tuple[str, int]) -> None:
        pending = self._pending.get(msg.msg_id)
        if pending is None or pending[2] != address:
            self.stats["unmatched_responses"] += 1
            return
        future, timer, _, method, sent_at = self._pending.pop(msg.msg_id)
        timer.cancel()
        if method in RTT_SAMPLED_METHODS:
            self._sample_rtt(time.monotonic() - sent_at)
        try:
            value = REPLY_CHECKS[method](msg.value)
        except ProtocolError as exc:
            self.stats["bad_responses"] += 1
            log.debug("bad %s reply from %s: %s", method, address, exc)
            result: RpcResult = (False, None)
        else:
            result = (True, value)
        if not future.done():
            future.set_result(result)

    # -- sending ----------------------------------------------------------------
    def _call(self, address: tuple[str, int], method: str, *args: Any) -> asyncio.Future[RpcResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RpcResult] = loop.create_future()
        if self._closed or self.transport is None:
            future.set_result((False, None))
            return future
        payload = packb([method, list(args)])
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ProtocolError(f"{method} request exceeds {MAX_PAYLOAD_BYTES} bytes")
        msg_id = os.urandom(MSG_ID_LEN_BYTES)
        address = (address[0], address[1])
        timer = loop.call_later(self._wait_timeout, self._on_timeout, msg_id)
        self._pending[msg_id] = (future, timer, address, method, time.monotonic())
        self.transport.sendto(bytes([KIND_REQUEST]) + msg_id + payload, address)
        return future

    def _on_timeout(self, msg_id: bytes) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is not None:
            self.stats["rpc_timeouts"] += 1
            if not pending[0].done():
                pending[0].set_result((False, None))

    async def stun(self, address: tuple[str, int]) -> tuple[str, int] | None:
        """Ask a DHT peer where it sees us from; None when it does not answer."""
        ok, value = await self._call(address, "stun", self.source_node.id)
        return value if ok else None

    async def ping(self, address: tuple[str, int], nodeid: bytes) -> RpcResult:
        return await self._call(address, "ping", nodeid)

    async def store(self, address: tuple[str, int], nodeid: bytes, key: bytes,
                    value: bytes) -> RpcResult:
        return await self._call(address, "store", nodeid, key, value)

    async def find_node(self, address: tuple[str, int], nodeid: bytes, key: bytes) -> RpcResult:
        return await self._call(address, "find_node", nodeid, key)

    async def find_value(self, address: tuple[str, int], nodeid: bytes, key: bytes) -> RpcResult:
        return await self._call(address, "find_value", nodeid, key)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
        ok, reply = await self.find_node((node_to_ask.ip, node_to_ask.port),
                                         self.source_node.id, node_to_find.id)
        if ok:
            self._note_useful(node_to_ask)
        return self.handle_call_response((ok, reply), node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
        ok, reply = await self.find_value((node_to_ask.ip, node_to_ask.port),
                                          self.source_node.id, node_to_find.id)
        if ok:
            self._note_useful(node_to_ask)
        return self.handle_call_response((ok, reply), node_to_ask)

    async def call_ping(self, node_to_ask: Node) -> RpcResult:
        ok, reply = await self.ping((node_to_ask.ip, node_to_ask.port), self.source_node.id)
        # a ping answer names the responder: another id there means ours is gone
        result: RpcResult = (True, reply) if ok and reply == node_to_ask.id else (False, None)
        return self.handle_call_response(result, node_to_ask)

    def handle_call_response(self, result: RpcResult, node: Node) -> RpcResult:
        """Every answer to a request of ours (or its absence) passes here.

        Fix ADMISSION: this is the only way into the routing table.
        """
        if not result[0]:
            self._note_failure(node)
            self._useful.pop(_contact_key(node), None)
            self.router.remove_contact(node)
            return result
        self._failed.pop(_contact_key(node), None)
        if self.router.contains(node):
            self.router.touch(node)
        else:
            self.welcome_if_new(node)
        return result

    # -- admission, eviction, failures, RTT ---------------------------------------
    def _note_failure(self, node: Node) -> None:
        key = _contact_key(node)
        self._failed.pop(key, None)
        self._failed[key] = time.monotonic()
        while len(self._failed) > MAX_FAILED_REMEMBERED:
            self._failed.popitem(last=False)

    def _note_useful(self, node: Node) -> None:
        key = _contact_key(node)
        self._useful.pop(key, None)
        self._useful[key] = None
        while len(self._useful) > MAX_USEFUL_REMEMBERED:
            self._useful.popitem(last=False)

    def answered_lookups(self, node: Node) -> bool:
        """Has this contact answered a find_node/find_value of ours (not only a ping)?"""
        return _contact_key(node) in self._useful

    def failed_recently(self, node: Node) -> bool:
        """Did this id at this address fail to answer us within the last FAILED_MEMORY_S?"""
        key = _contact_key(node)
        at = self._failed.get(key)
        if at is None:
            return False
        if time.monotonic() - at > FAILED_MEMORY_S:
            del self._failed[key]
            return False
        return True

    def consider(self, node: Node) -> None:
        """Fix ADMISSION: an unknown sender gets a verification ping, never a table slot."""
        if node.id == self.source_node.id or self._closed or self.router.knows(node):
            return
        address = (node.ip, node.port)
        if address in self._verifying or node.id in self._verifying_ids:
            return
        if len(self._verifying) >= MAX_PENDING_VERIFICATIONS or self.failed_recently(node):
            self.stats["verifications_skipped"] += 1
            return
        self._verifying.add(address)
        self._verifying_ids.add(node.id)
        self.spawn(self._verify(node))

    async def _verify(self, node: Node) -> None:
        try:
            ok, _ = await self.call_ping(node)  # an answer admits it (handle_call_response)
            self.stats["verified_contacts" if ok else "unverified_contacts"] += 1
        finally:
            self._verifying.discard((node.ip, node.port))
            self._verifying_ids.discard(node.id)

    def check_head(self, head: Node) -> None:
        """Fix EVICTION: ping a full bucket's least-recently-seen contact, once at a time."""
        if head.id in self._head_checks:
            return
        self._head_checks.add(head.id)
        self.spawn(self._check_head(head))

    async def _check_head(self, head: Node) -> None:
        try:
            await self.call_ping(head)  # answer: touched to the tail; none: replaced
        finally:
            self._head_checks.discard(head.id)

    def _sample_rtt(self, rtt_s: float) -> None:
        if self.srtt_s is None:
            self.srtt_s, self.rttvar_s = rtt_s, rtt_s / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt_s)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt_s

    def stall_timeout_s(self) -> float:
        """How long a lookup waits for one contact before it asks another instead."""
        srtt = INITIAL_RTT_S if self.srtt_s is None else self.srtt_s
        return min(max(srtt + 4 * self.rttvar_s, STALL_MIN_S), STALL_MAX_S, self._wait_timeout)

    # -- serving ------------------------------------------------------------------
    def _sender(self, address: tuple[str, int], nodeid: bytes) -> Node:
        node = Node(nodeid, address[0], address[1])
        self.consider(node)
        return node

    def rpc_stun(self, sender: tuple[str, int], nodeid: bytes) -> list[Any]:
        # the answer is smaller than the request, so no amplification; the caller is not
        # added to the routing table (asking where one is seen is not taking part)
        return [sender[0], sender[1]]

    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes) -> bytes:
        self._sender(sender, nodeid)
        return self.source_node.id  # type: ignore[no-any-return]

    def rpc_store(self, sender: tuple[str, int], nodeid: bytes, key: bytes, value: bytes) -> bool:
        self._sender(sender, nodeid)
        # Fix STORE: only valid, current, non-stale signed records, within bounds
        try:
            outcome = self.storage.put(key, value, sender=sender[0])
        except ProtocolError as exc:
            self.stats["rejected_stores"] += 1
            log.debug("rejected store from %s: %s", sender, exc)
            return False
        if outcome is StoreOutcome.STORED:
            self.stats["accepted_stores"] += 1
            if self.on_stored is not None:
                self.on_stored(key)
        elif outcome is StoreOutcome.STALE:
            self.stats["stale_stores"] += 1
        elif outcome is StoreOutcome.FULL:
            self.stats["full_stores"] += 1
        return outcome in (StoreOutcome.STORED, StoreOutcome.UNCHANGED)

    def rpc_find_node(self, sender: tuple[str, int], nodeid: bytes,
                      key: bytes) -> list[tuple[bytes, str, int]]:
        source = self._sender(sender, nodeid)
        neighbors = self.router.find_neighbors(Node(key), exclude=source)
        return [(n.id, n.ip, n.port) for n in neighbors]

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes,
                       key: bytes) -> dict[str, bytes] | list[tuple[bytes, str, int]]:
        value = self.storage.get(key)
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        self._sender(sender, nodeid)
        return {"value": value}

    # -- joining nodes --------------------------------------------------------------
    def welcome_if_new(self, node: Node) -> None:
        if node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        for key, value in self.replication_targets(node):
            self.stats["replications"] += 1
            self.spawn(self.call_store(node, key, value))
        self.router.add_contact(node)

    def replication_targets(self, node: Node) -> list[tuple[bytes, bytes]]:
        """Keys the new `node` should hold (paper section 2.5), from a bounded window.

        Fix JOIN COST: only the REPLICATE_WINDOW_KEYS keys nearest the new node are
        examined (not every stored key), and stores are rate limited.
        Fix DIGEST BUG: the key is already a 160-bit id: Node(key), not Node(digest(key)).
        """
        out = []
        for key, value in self.storage.closest_keys(node.id, REPLICATE_WINDOW_KEYS):
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = (self.source_node.distance_to(keynode)
                                < neighbors[0].distance_to(keynode))
                if not (new_node_close and this_closest):
                    continue
            if not self._take_token():
                self.stats["replications_skipped"] += 1
                break
            out.append((key, value))
        return out

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(REPLICATE_BURST_STORES,
                           self._tokens + (now - self._tokens_at) * REPLICATE_STORES_PER_S)
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # -- background tasks and shutdown ---------------------------------------------------
    def spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any] | None:
        """Run `coro` as a tracked task (cancelled on close); None once closed."""
        if self._closed:
            if asyncio.iscoroutine(coro):
                coro.close()
            return None
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats["handler_errors"] += 1
            log.error("DHT background task failed: %r", task.exception())

    async def close(self) -> None:
        """Resolve every pending RPC as failed and cancel background tasks."""
        self._closed = True
        for future, timer, _, _, _ in self._pending.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._pending.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
