"""Hole punching on 127.0.0.1 (no NAT here: tests/netns/test_nat_punch.py has real ones):
the driver over real udp listeners, and peering's upgrade of a relayed peer to a
hole-punched path that later dials use."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import node.reach.puncher as puncher_mod
from bootstrap.relay import RelayServer
from node.channel import SecureChannel
from node.contact import ContactRecord
from node.errors import ChannelClosed, P2PError, ProtocolError
from node.identity import Identity, PeerId
from node.peering import Peering
from node.reach.punch import (
    PUNCH_DATAGRAM,
    PunchConnect,
    PunchInitiator,
    PunchResponder,
)
from node.reach.puncher import run_initiator, run_responder
from node.reach.relay_client import RelayReservation
from node.transports import udp
from node.transports.base import Pipe
from node.trust import TrustStore
from node.wire import packb


class QueueMessenger:
    """One end of an in-memory, already authenticated channel."""

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes]) -> None:
        self.inbox, self.outbox = inbox, outbox

    async def send(self, data: bytes) -> None:
        await self.outbox.put(data)

    async def recv(self) -> bytes:
        return await self.inbox.get()


def messenger_pair() -> tuple[QueueMessenger, QueueMessenger]:
    a: asyncio.Queue[bytes] = asyncio.Queue()
    b: asyncio.Queue[bytes] = asyncio.Queue()
    return QueueMessenger(a, b), QueueMessenger(b, a)


class CountingSocket:
    """A PunchSocket that records raw datagrams and cannot connect anywhere."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str, int]] = []

    async def connect_from_listener(self, host: str, port: int, *, timeout: float) -> Pipe:
        raise AssertionError("not expected to dial")

    def send_datagram(self, data: bytes, host: str, port: int) -> None:
        self.sent.append((data, host, port))


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def two_listeners() -> AsyncIterator[tuple[udp.UdpListener, udp.UdpListener,
                                                 list[Pipe]]]:
    accepted: list[Pipe] = []

    async def echo(pipe: Pipe) -> None:
        accepted.append(pipe)
        with contextlib.suppress(ChannelClosed):
            while True:
                await pipe.send(await pipe.recv())

    a = await udp.listen("127.0.0.1", 0, echo, preauth=False)
    b = await udp.listen("127.0.0.1", 0, echo, preauth=False)
    try:
        yield a, b, accepted
    finally:
        await a.close()
        await b.close()


async def test_driver_punches_from_the_listening_sockets() -> None:
    async with two_listeners() as (a, b, accepted):
        ma, mb = messenger_pair()
        dead = ("127.0.0.1", 9)  # the first endpoint answers nothing; the second does
        ini = PunchInitiator([("127.0.0.1", a.port)])
        res = PunchResponder([dead, ("127.0.0.1", b.port)])
        out_a, out_b = await asyncio.wait_for(asyncio.gather(
            run_initiator(ma, ini, a), run_responder(mb, res, b)), 10.0)
        assert out_a.ok and out_b.ok and out_a.attempts == 1
        assert out_a.endpoint == ("127.0.0.1", b.port)
        assert out_b.peer_endpoints == (("127.0.0.1", a.port),)
        pipe = out_a.pipe
        assert pipe is not None
        await pipe.send(b"over the punched path")
        assert await asyncio.wait_for(pipe.recv(), 5.0) == b"over the punched path"
        # b saw a's connection come from a's *listening* socket: the mapping peers learn
        await until(lambda: bool(accepted))
        assert accepted[0].remote == ("127.0.0.1", a.port)
        # b opened its "NAT" towards a with punch datagrams, which a's listener dropped
        await until(lambda: a.dropped_datagrams > 0)
        await pipe.close()


async def test_driver_gives_up_after_three_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(puncher_mod, "ATTEMPT_DIAL_S", 0.2)
    async with two_listeners() as (a, b, _accepted):
        ma, mb = messenger_pair()
        ini = PunchInitiator([("127.0.0.1", a.port)])
        res = PunchResponder([("127.0.0.1", 9)])  # nothing answers there
        out_a, out_b = await asyncio.wait_for(asyncio.gather(
            run_initiator(ma, ini, a), run_responder(mb, res, b)), 10.0)
        assert not out_a.ok and not out_b.ok
        assert out_a.attempts == out_b.attempts == 3
        assert out_a.pipe is None and a.connections == 0


async def test_a_bad_connect_makes_the_responder_send_nothing() -> None:
    ma, mb = messenger_pair()
    sock = CountingSocket()
    too_many = [["198.18.0.1", 1000 + i] for i in range(9)]
    await ma.send(packb(["pch-connect", 1, 1, too_many]))
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(run_responder(mb, PunchResponder([]), sock), 5.0)
    assert sock.sent == []


async def test_sync_before_connect_is_refused_before_any_datagram() -> None:
    ma, mb = messenger_pair()
    sock = CountingSocket()
    await ma.send(packb(["pch-sync", 1, 1]))
    with pytest.raises(ProtocolError):
        await asyncio.wait_for(run_responder(mb, PunchResponder([]), sock), 5.0)
    assert sock.sent == []
    # a well-formed exchange does send: the check above is not vacuous
    ma, mb = messenger_pair()
    task = asyncio.create_task(run_responder(mb, PunchResponder([]), sock))
    await ma.send(PunchConnect(1, (("127.0.0.1", 9),)).encode())
    await ma.recv()
    await ma.send(packb(["pch-sync", 1, 1]))
    await until(lambda: bool(sock.sent))
    assert sock.sent[0] == (PUNCH_DATAGRAM, "127.0.0.1", 9)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- peering: relayed first, punched next ---------------------------------------------
class Node:
    def __init__(self, tmp_path: Path, name: str,
                 records: dict[PeerId, ContactRecord]) -> None:
        self.identity = Identity.generate(name)
        self.trust = TrustStore(tmp_path / f"trust-{name}.db")
        self.records = records

        async def locate(peer: PeerId) -> ContactRecord | None:
            return records.get(peer)

        self.peering = Peering(self.identity, self.trust, host="127.0.0.1",
                               ports={"tcp": 0, "udp": 0}, transports=["tcp", "udp"],
                               locate=locate)
        self.peering.register("sink", self._sink)
        self.served: list[SecureChannel] = []

    async def _sink(self, channel: SecureChannel) -> None:
        self.served.append(channel)
        with contextlib.suppress(ChannelClosed):
            while True:
                await channel.send(await channel.recv())

    def record(self) -> ContactRecord:
        return self.records[self.identity.peer_id]


async def _closed_tcp_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


@contextlib.asynccontextmanager
async def relayed_pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """alice and bob, each with a dead tcp port (as behind a NAT), a real udp listener
    and a reservation at one relay; bob's record names the relay."""
    relay = RelayServer()
    port = await relay.start("127.0.0.1", 0)
    addr = f"127.0.0.1:{port}"
    records: dict[PeerId, ContactRecord] = {}
    alice, bob = Node(tmp_path, "alice", records), Node(tmp_path, "bob", records)
    alice.trust.trust(bob.identity.peer_id, "bob")
    bob.trust.trust(alice.identity.peer_id, "alice")
    reservation = RelayReservation(bob.identity, addr, bob.peering.accept_pipe)
    task = asyncio.create_task(reservation.run())
    try:
        for n in (alice, bob):
            ports = await n.peering.start()
            records[n.identity.peer_id] = ContactRecord.create(
                n.identity, ["127.0.0.1"], {"tcp": await _closed_tcp_port(),
                                            "udp": ports["udp"]}, 1, relays=[addr])
            n.peering.enable_punching(n.record)
        await asyncio.wait_for(reservation.reserved.wait(), 5.0)
        yield alice, bob
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for n in (alice, bob):
            await n.peering.stop()
            n.trust.close()
        await relay.close()


async def test_relayed_peer_is_upgraded_and_the_next_dial_is_hole_punched(
        tmp_path: Path) -> None:
    async with relayed_pair(tmp_path) as (alice, bob):
        bob_id = bob.identity.peer_id
        first = await alice.peering.connect(bob_id, "sink", transport="tcp")
        assert first.path == "relayed"
        assert alice.peering.puncher is not None
        await until(lambda: alice.peering.puncher.succeeded == 1)  # type: ignore[union-attr]
        # a channel whose service does not resume stays on the relay
        await first.send(b"still over the relay")
        assert await first.recv() == b"still over the relay"
        await first.close()

        second = await alice.peering.connect(bob_id, "sink", transport="tcp")
        assert (second.path, second.transport) == ("hole-punched", "udp")
        assert second.remote == ("127.0.0.1", bob.record().ports["udp"])
        await second.send(b"direct")
        assert await second.recv() == b"direct"
        await until(lambda: len(bob.served) == 2)
        assert bob.served[1].path == "hole-punched"
        await second.close()
        status = alice.peering.puncher.status()
        assert status["punches"] == 1 and status["last"]["ok"]
        # bob learned the path back to alice from her verified udp channel
        assert bob.peering.puncher is not None
        assert alice.identity.peer_id.short in bob.peering.puncher.status()["punched"]


async def test_a_relayed_transfer_channel_is_closed_once_punched(tmp_path: Path) -> None:
    async with relayed_pair(tmp_path) as (alice, bob):
        bob.peering.register("transfer", bob._sink)
        channel = await alice.peering.connect(bob.identity.peer_id, "transfer",
                                              transport="tcp")
        assert channel.path == "relayed"
        # the share's retry (node/sharing.py) resumes it over the punched path
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(channel.recv(), 10.0)
        assert alice.peering.puncher is not None
        assert alice.peering.puncher.succeeded == 1


async def test_one_punch_per_peer_at_a_time() -> None:
    from node.reach.puncher import HolePuncher

    sock = CountingSocket()

    async def never(peer: PeerId) -> QueueMessenger:
        raise AssertionError("not dialling")

    async def verify(peer: PeerId, pipe: Pipe) -> None:
        raise AssertionError("not verifying")

    puncher = HolePuncher(sock, lambda: [("127.0.0.1", 9)], open_coordination=never,  # type: ignore[arg-type]
                          verify=verify)
    peer = Identity.generate("p").peer_id
    ma, mb = messenger_pair()
    first = asyncio.create_task(puncher.serve(peer, mb))
    await ma.send(PunchConnect(1, (("127.0.0.1", 9),)).encode())
    await ma.recv()  # the first punch is running
    with pytest.raises(ProtocolError, match="already running"):
        await puncher.serve(peer, messenger_pair()[1])
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    # once it ended, the peer may punch again
    ma2, mb2 = messenger_pair()
    again = asyncio.create_task(puncher.serve(peer, mb2))
    await ma2.send(PunchConnect(1, ()).encode())
    assert await asyncio.wait_for(ma2.recv(), 5.0)
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)


async def test_an_untrusted_peer_cannot_start_a_punch(tmp_path: Path) -> None:
    records: dict[PeerId, ContactRecord] = {}
    bob, mallory = Node(tmp_path, "bob", records), Node(tmp_path, "mallory", records)
    mallory.trust.trust(bob.identity.peer_id, "bob")  # bob does not trust mallory
    try:
        for n in (bob, mallory):
            ports = await n.peering.start()
            records[n.identity.peer_id] = ContactRecord.create(
                n.identity, ["127.0.0.1"], ports, 1)
            n.peering.enable_punching(n.record)
        assert bob.peering.puncher is not None
        served: list[PeerId] = []

        async def serve(peer: PeerId, channel: object) -> None:
            served.append(peer)

        bob.peering.puncher.serve = serve  # type: ignore[assignment,method-assign]
        with pytest.raises((ChannelClosed, P2PError)):
            channel = await mallory.peering.connect(bob.identity.peer_id, "punch",
                                                    transport="tcp", punch=False)
            await asyncio.wait_for(channel.recv(), 5.0)
        # the same request from a trusted peer does reach the punch service
        bob.trust.trust(mallory.identity.peer_id, "mallory")
        channel = await mallory.peering.connect(bob.identity.peer_id, "punch",
                                                transport="tcp", punch=False)
        await until(lambda: served == [mallory.identity.peer_id])
        await channel.close()
    finally:
        for n in (bob, mallory):
            await n.peering.stop()
            n.trust.close()
