"""In-process DHT networks on 127.0.0.1: publish/lookup, join via one peer, attacks, rejoin."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kademlia.node import Node

from dht.lookup import MAX_LOOKUP_QUERIES, RecordCrawl
from dht.node import DhtNode
from dht.peercache import PeerCache
from dht.protocol import HardenedProtocol
from node.contact import ContactRecord
from node.errors import ProtocolError
from node.identity import Identity
from node.wire import packb

HOST = "127.0.0.1"
RPC_TIMEOUT_S = 0.4
N_NODES = 12


def make_record(node: DhtNode, seq: int = 1, tcp_port: int = 7000) -> ContactRecord:
    return ContactRecord.create(node.identity, [HOST], {"tcp": tcp_port, "dht": node.port}, seq)


async def start_node(identity: Identity | None = None, **kw: Any) -> DhtNode:
    node = DhtNode(identity or Identity.generate(), host=HOST, port=0,
                   rpc_timeout_s=RPC_TIMEOUT_S, **kw)
    await node.start()
    return node


class Net:
    def __init__(self) -> None:
        self.nodes: list[DhtNode] = []
        self.errors: list[dict[str, Any]] = []

    async def add(self, node: DhtNode | None = None, *, via: int | None = 0,
                  publish: bool = True) -> DhtNode:
        node = node or await start_node()
        if via is not None and self.nodes:
            assert await node.bootstrap([(HOST, self.nodes[via].port)]) == 1
        self.nodes.append(node)
        if publish:
            await node.set_record(make_record(node))
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.stop()


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: n.errors.append(ctx))
    try:
        yield n
    finally:
        await n.close()
        await asyncio.sleep(0)
        loop.set_exception_handler(None)
    assert n.errors == [], n.errors  # no unhandled task exception anywhere


async def build(net: Net, n: int = N_NODES) -> list[DhtNode]:
    for _ in range(n):
        await net.add()
    # publish again now that everyone is in: early records reached only early nodes
    for node in net.nodes:
        assert await node.set_record(make_record(node, seq=2)) >= 1
    return list(net.nodes)


class RawPeer(asyncio.DatagramProtocol):
    """A hostile peer speaking the wire format by hand."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x01":  # replies only; the node may also call us (pings, stores)
            self.replies.append(data)


async def raw_peer() -> tuple[asyncio.DatagramTransport, RawPeer]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(RawPeer, local_addr=(HOST, 0))
    return transport, proto


def raw_request(method: str, args: list[Any]) -> bytes:
    return b"\x00" + os.urandom(20) + packb([method, args])


async def wait_for_replies(proto: RawPeer, n: int, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(proto.replies) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------

async def test_binds_the_configured_host(net: Net) -> None:
    node = await net.add()
    host, port = node.server.transport.get_extra_info("sockname")[:2]
    assert host == HOST and port == node.port != 0


async def test_publish_then_lookup_from_every_node(net: Net) -> None:
    nodes = await build(net)
    for i, asker in enumerate(nodes):
        for target in nodes[i + 1:i + 4]:
            res = await asker.lookup(target.identity.peer_id)
            assert res is not None, (i, target.port)
            assert res.record.peer_id == target.identity.peer_id
            assert res.record.seq == 2 and res.record.ports["dht"] == target.port
            assert 1 <= res.hops <= res.queries and res.elapsed_s > 0
    assert all(len(n.contacts()) >= 1 for n in nodes)


async def test_node_knowing_one_peer_finds_everyone(net: Net) -> None:
    nodes = await build(net)
    newcomer = await start_node()
    assert await newcomer.bootstrap([(HOST, nodes[7].port)]) == 1
    net.nodes.append(newcomer)
    for target in nodes:
        res = await newcomer.lookup(target.identity.peer_id)
        assert res is not None and res.record == target.record
    # and it is findable itself once published
    assert await newcomer.set_record(make_record(newcomer)) >= 1
    res = await nodes[2].lookup(newcomer.identity.peer_id)
    assert res is not None and res.record == newcomer.record


async def test_unknown_peer_is_not_found(net: Net) -> None:
    nodes = await build(net, 5)
    assert await nodes[0].lookup(Identity.generate().peer_id) is None


async def test_forged_stores_never_come_back_as_valid(net: Net) -> None:
    nodes = await build(net)
    victim = nodes[3]
    key = victim.dht_id
    mallory = Identity.generate("mallory")
    genuine = victim.record
    assert genuine is not None
    tampered = dataclasses.replace(genuine, hosts=("127.6.6.6",), seq=genuine.seq + 10)
    foreign = ContactRecord.create(mallory, ["127.6.6.6"], {"tcp": 1}, 99)
    values: list[Any] = [[1, 2], tampered.encode(), foreign.encode(), b"\x00" * 100, "text"]
    transport, proto = await raw_peer()
    try:
        for node in nodes:
            for value in values:
                transport.sendto(raw_request("store", [mallory.peer_id.dht_id, key, value]),
                                 (HOST, node.port))
        # list/text values are dropped as malformed; the three byte values get a `False`
        await wait_for_replies(proto, 3 * len(nodes))
    finally:
        transport.close()
    assert sum(n.stats["rejected_stores"] for n in nodes) == 3 * len(nodes)
    assert sum(n.stats["dropped_datagrams"] for n in nodes) == 2 * len(nodes)
    assert all(r[-1:] == b"\xc2" for r in proto.replies)  # msgpack False
    for asker in nodes:
        res = await asker.lookup(victim.identity.peer_id)
        assert res is not None and res.record == genuine


async def test_lying_nodes_answers_are_ignored(net: Net) -> None:
    victim_ident = Identity.generate("victim")
    key = victim_ident.peer_id.dht_id

    class LyingProtocol(HardenedProtocol):
        def rpc_find_value(self, sender: Any, nodeid: bytes, key_: bytes) -> Any:
            self._sender(sender, nodeid)
            forged = dataclasses.replace(victim_record, hosts=("127.6.6.6",), seq=999)
            return {"value": forged.encode()}

    # liars whose ids share 8 leading bits with the victim's: they are asked first
    liars = []
    while len(liars) < 3:
        ident = Identity.generate()
        if ident.peer_id.dht_id[0] == key[0]:
            liar = DhtNode(ident, host=HOST, port=0, rpc_timeout_s=RPC_TIMEOUT_S)
            liar.server.protocol_class = LyingProtocol
            await liar.start()
            liars.append(liar)
    for _ in range(8):
        await net.add(publish=False)
    for liar in liars:
        await net.add(liar, publish=False)
    victim = await net.add(await start_node(victim_ident), publish=False)
    victim_record = make_record(victim, seq=3)
    assert await victim.set_record(victim_record) >= 1
    for asker in net.nodes[:8]:
        res = await asker.lookup(victim_ident.peer_id)
        assert res is not None and res.record == victim_record
    assert sum(n.stats["rejected_records"] for n in net.nodes[:8]) >= 8


async def test_lower_seq_replay_does_not_win(net: Net) -> None:
    nodes = await build(net)
    victim = nodes[5]
    old = make_record(victim, seq=3, tcp_port=1111)
    new = make_record(victim, seq=4, tcp_port=2222)
    assert await victim.set_record(old) >= 1
    assert await victim.set_record(new) >= 1
    with pytest.raises(ProtocolError):
        await victim.set_record(old)
    transport, proto = await raw_peer()
    try:
        for node in nodes:
            transport.sendto(raw_request("store", [os.urandom(20), victim.dht_id, old.encode()]),
                             (HOST, node.port))
        await wait_for_replies(proto, len(nodes))
    finally:
        transport.close()
    assert sum(n.stats["stale_stores"] for n in nodes) >= 1
    assert all(r[-1:] == b"\xc2" or r[-1:] == b"\xc3" for r in proto.replies)
    for asker in nodes:
        res = await asker.lookup(victim.identity.peer_id)
        assert res is not None and res.record == new


async def test_malformed_datagrams_are_survived(net: Net) -> None:
    nodes = await build(net, 6)
    target = nodes[0]
    ident = b"\x05" * 20
    bad = [
        os.urandom(64), b"\x00", b"\x00" + os.urandom(20),
        raw_request("ping", [ident])[:-4],                    # truncated
        raw_request("ping", [ident]) + os.urandom(9000),      # oversize
        raw_request("ping", []), raw_request("find_node", [ident]),  # wrong arity
        raw_request("store", [1, 2, 3]), raw_request("find_value", ["x", ident]),  # types
        raw_request("bogus", [ident]), b"\x09" + os.urandom(40),
        b"\x00" + os.urandom(20) + packb({"a": 1}),
        b"\x00" + os.urandom(20) + b"\xdd\xff\xff\xff\xff",   # huge array header
    ]
    before = target.stats["dropped_datagrams"]
    transport, proto = await raw_peer()
    try:
        for _ in range(20):
            for data in bad:
                transport.sendto(data, (HOST, target.port))
            transport.sendto(b"", (HOST, target.port))  # empty: not even delivered
            await asyncio.sleep(0.005)  # do not overrun the socket buffer
        transport.sendto(b"\x01" + os.urandom(20) + packb(True), (HOST, target.port))
        transport.sendto(raw_request("ping", [ident]), (HOST, target.port))
        await wait_for_replies(proto, 1)
    finally:
        transport.close()
    assert len(proto.replies) == 1  # only the valid ping was answered
    assert target.stats["dropped_datagrams"] - before == 20 * len(bad)
    assert target.stats["unmatched_responses"] >= 1
    assert target.stats["handler_errors"] == 0
    res = await nodes[3].lookup(target.identity.peer_id)
    assert res is not None and res.record == target.record
    res = await target.lookup(nodes[4].identity.peer_id)
    assert res is not None and res.record == nodes[4].record


async def test_publish_with_every_contact_dead_fails_cleanly_and_fast(net: Net) -> None:
    a = await net.add(publish=False)
    b = await start_node()
    assert await b.bootstrap([(HOST, a.port)]) == 1
    await a.stop()
    net.nodes.remove(a)
    net.nodes.append(b)
    t0 = time.monotonic()
    # kademlia's set_digest raised `ValueError: max() iterable argument is empty` here
    assert await b.set_record(make_record(b)) == 0
    assert time.monotonic() - t0 < 4 * RPC_TIMEOUT_S
    assert b.contacts() == []
    # dead and unresolvable bootstrap addresses are skipped, never raised
    assert await b.bootstrap([(HOST, a.port), ("no-such-host.invalid", 1)]) == 0
    assert await b.lookup(a.identity.peer_id) is None


async def test_rejoin_from_peer_cache_alone(net: Net, tmp_path: Path) -> None:
    nodes = await build(net, 8)
    path = tmp_path / "peers.db"
    ident = Identity.generate("returning")
    cache = PeerCache(path)
    first = await start_node(ident, cache=cache)
    assert await first.bootstrap([(HOST, nodes[0].port)]) == 1
    for target in nodes:
        assert await first.lookup(target.identity.peer_id) is not None
    await first.stop()
    cache.close()

    cache = PeerCache(path)
    try:
        assert len(cache.dht_addresses()) >= len(nodes)
        again = await start_node(ident, cache=cache)
        net.nodes.append(again)
        assert await again.bootstrap([]) >= len(nodes) // 2  # no seed given at all
        for target in nodes:
            res = await again.lookup(target.identity.peer_id)
            assert res is not None and res.record == target.record
        assert await again.set_record(make_record(again)) >= 1
        res = await nodes[1].lookup(ident.peer_id)
        assert res is not None and res.record == again.record
    finally:
        await again.stop()
        net.nodes.remove(again)
        cache.close()


async def test_stores_feed_the_peer_cache(net: Net, tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db")
    try:
        watcher = await net.add(await start_node(cache=cache))
        await build(net, 5)
        others = {n.identity.peer_id for n in net.nodes if n is not watcher}
        cached = {r.peer_id for r, source, _ in cache.records() if source == "dht"}
        assert cached == others  # every record stored on us was verified and cached
    finally:
        await net.close()
        net.nodes.clear()
        cache.close()


async def test_republish_restores_and_resigns_the_record(net: Net) -> None:
    nodes = await build(net, 4)
    publisher = await start_node(republish_s=0.2)
    await net.add(publisher, publish=False)
    # a short-lived record: the node must re-sign it (seq + 1) before it expires
    short = ContactRecord.create(publisher.identity, [HOST], {"dht": publisher.port}, 1,
                                 ttl_s=30)
    assert await publisher.set_record(short) >= 1
    holder = nodes[0]
    holder.storage._remove(publisher.dht_id)  # the holder lost it (restart, eviction)
    assert holder.storage.get_record(publisher.dht_id) is None
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        got = holder.storage.get_record(publisher.dht_id)
        if got is not None and got.seq >= 2:
            break
        await asyncio.sleep(0.05)
    got = holder.storage.get_record(publisher.dht_id)
    assert got is not None and got.seq >= 2 and publisher.record is not None
    assert publisher.record.seq >= 2
    res = await nodes[1].lookup(publisher.identity.peer_id)
    assert res is not None and res.record.seq >= 2


# -- fake and dead contacts (issue 7) ------------------------------------------------------

class Silent(asyncio.DatagramProtocol):
    """A socket on 127.0.0.1 that never answers anything."""


async def silent_sockets(n: int) -> list[asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    out = []
    for _ in range(n):
        transport, _ = await loop.create_datagram_endpoint(Silent, local_addr=(HOST, 0))
        out.append(transport)
    return out


def _port(t: asyncio.DatagramTransport) -> int:
    return int(t.get_extra_info("sockname")[1])


def near(key: bytes, i: int) -> bytes:
    """An id that differs from `key` only in its last bits: closer than any real node."""
    return (int.from_bytes(key, "big") ^ i).to_bytes(20, "big")


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.02)


async def test_fake_ids_sent_by_datagrams_never_enter_a_routing_table(net: Net) -> None:
    nodes = await build(net, 6)
    fakes = await silent_sockets(30)
    fake_ids = {near(nodes[2].dht_id, i + 1) for i in range(len(fakes))}
    try:
        for t, fake_id in zip(fakes, sorted(fake_ids), strict=True):
            for node in nodes:
                t.sendto(raw_request("ping", [fake_id]), (HOST, node.port))
        # every fake earned one verification ping on every node, and failed it
        await wait_until(lambda: sum(n.stats["unverified_contacts"] for n in nodes)
                         == len(fakes) * len(nodes))
        assert not {cid for n in nodes for cid, _, _ in n.contact_ids()} & fake_ids
        res = await nodes[0].lookup(nodes[2].identity.peer_id)
        assert res is not None and res.record == nodes[2].record
    finally:
        for t in fakes:
            t.close()


async def test_lookup_does_not_wait_for_dead_contacts_in_the_table(net: Net) -> None:
    nodes = await build(net, 8)
    target = nodes[5]
    long_timeout_s = 10.0
    asker = DhtNode(Identity.generate(), host=HOST, port=0, rpc_timeout_s=long_timeout_s)
    await asker.start()
    net.nodes.append(asker)
    assert await asker.bootstrap([(HOST, nodes[0].port)]) == 1
    # contacts that answered once and died since, all closer to the target than anyone
    dead = await silent_sockets(30)
    try:
        for i, t in enumerate(dead):
            asker.protocol.router.add_contact(Node(near(target.dht_id, i + 1), HOST, _port(t)))
        # the target itself is not in our table, and no contact is known to answer
        # lookups, so the dead come first: (nearly) all k closest we know are dead
        asker.protocol.router.remove_contact(Node(target.dht_id, HOST, target.port))
        asker.protocol._useful.clear()
        dead_ports = {_port(t) for t in dead}
        nearest = asker.protocol.router.find_neighbors(Node(target.dht_id))
        dead_first = sum(1 for n in nearest if n.port in dead_ports)
        # (their shared bucket holds k; a live contact may take the last place)
        assert dead_first >= asker.server.ksize - 1
        before = asker.stats["rpc_timeouts"]
        # kademlia waited a full RPC timeout per round with a dead contact in it: the
        # deadline is shorter than one, so passing proves no dead contact was waited for
        res = await asyncio.wait_for(asker.lookup(target.identity.peer_id), long_timeout_s * 0.8)
        assert res is not None and res.record == target.record
        assert asker.stats["rpc_timeouts"] == before
        # it met all of them and went on past them (kademlia gave up there)
        assert dead_first <= asker.stats["lookup_stalls"] <= MAX_LOOKUP_QUERIES
    finally:
        await asker.stop()
        for t in dead:
            t.close()


async def test_contacts_that_failed_are_asked_last(net: Net) -> None:
    nodes = await build(net, 8)
    target, gossip, asker = nodes[5], nodes[1], nodes[0]
    dead = await silent_sockets(6)
    try:
        dead_nodes = [Node(near(target.dht_id, i + 1), HOST, _port(t))
                      for i, t in enumerate(dead)]
        for n in dead_nodes:  # the gossip node still lists them, closest of all
            gossip.protocol.router.add_contact(n)
        gossip.storage._remove(target.dht_id)  # so it answers with contacts, not the record
        start = [Node(gossip.dht_id, HOST, gossip.port)]
        dead_ids = {n.id for n in dead_nodes}

        async def crawl() -> RecordCrawl:
            c = RecordCrawl(asker.protocol, Node(target.dht_id), start, 4, 2)
            found = await c.find()
            assert any(rec == target.record for rec, _, _ in found)
            return c

        # control: not known to have failed, the closest come first
        fresh = await crawl()
        assert dead_ids & {n.id for n in fresh.asked}
        for n in dead_nodes:  # the asker saw each of them fail earlier
            asker.protocol.handle_call_response((False, None), n)
        again = await crawl()
        assert not dead_ids & {n.id for n in again.asked}
        assert again.stalls == 0
    finally:
        for t in dead:
            t.close()


async def test_contacts_that_answered_lookups_are_asked_before_ping_only_ones(net: Net) -> None:
    nodes = await build(net, 8)  # building made every node ask the others find_node
    target, gossip, asker = nodes[5], nodes[1], nodes[0]
    silent = await silent_sockets(6)
    try:
        # contacts only known to answer pings (or not even that), closest of all to the key
        unproven = [Node(near(target.dht_id, i + 1), HOST, _port(t))
                    for i, t in enumerate(silent)]
        for n in unproven:
            gossip.protocol.router.add_contact(n)
        gossip.storage._remove(target.dht_id)
        start = [Node(gossip.dht_id, HOST, gossip.port)]
        unproven_ids = {n.id for n in unproven}
        assert asker.protocol.answered_lookups(start[0])

        async def crawl() -> RecordCrawl:
            c = RecordCrawl(asker.protocol, Node(target.dht_id), start, 20, 2)
            found = await c.find()
            assert any(rec == target.record for rec, _, _ in found)
            return c

        proven_first = await crawl()
        assert not unproven_ids & {n.id for n in proven_first.asked}
        assert proven_first.stalls == 0
        # control: with nobody proven, the closest (silent) contacts are asked first
        asker.protocol._useful.clear()
        control = await crawl()
        assert unproven_ids & {n.id for n in control.asked}
    finally:
        for t in silent:
            t.close()
