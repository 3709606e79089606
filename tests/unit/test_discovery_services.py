"""The discovery services against fakes: bootstrap registration, DHT join/discover/stun."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest

from node.contact import ContactRecord
from node.discovery.bootstrap import BootstrapRegistration
from node.discovery.dht import DhtDiscovery
from node.discovery.observed import ObservedAddresses
from node.errors import PeerUnreachable
from node.identity import Identity, PeerId
from node.peerbook import PeerBook

ME = Identity.generate("me", seed=b"\x07" * 32)
BOB = Identity.generate("bob", seed=b"\x08" * 32)
CAROL = Identity.generate("carol", seed=b"\x09" * 32)


def rec(who: Identity, seq: int = 1) -> ContactRecord:
    return ContactRecord.create(who, ["127.0.0.1"], {"tcp": 9000, "dht": 9003 + seq}, seq)


class Stop(Exception):
    pass


def stopping_sleep(rounds: int) -> Any:
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= rounds:
            raise Stop
        await asyncio.sleep(0)

    sleep.delays = delays  # type: ignore[attr-defined]
    return sleep


class FakeClient:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.observed: tuple[str, int] | None = None
        self.calls: list[str] = []

    async def register(self, record: ContactRecord) -> list[ContactRecord]:
        self.calls.append("register")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.observed = ("198.19.0.9", 40123)
        return list(answer)

    async def list_peers(self, limit: int = 1000) -> list[dict[str, Any]]:
        self.calls.append("list")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [{"record": r} for r in answer]

    async def unregister(self, identity: Identity) -> None:
        self.calls.append("unregister")

    async def close(self) -> None:
        self.calls.append("close")


async def test_registration_marks_online_backs_off_and_reports_observed() -> None:
    book = PeerBook(ME.peer_id)
    client = FakeClient([[rec(BOB)], [rec(BOB), rec(CAROL)],
                         PeerUnreachable("server down"), [rec(CAROL)]])
    observed = ObservedAddresses()
    told: list[int] = []
    sleep = stopping_sleep(4)
    reg = BootstrapRegistration(ME, book, lambda: rec(ME), interval_s=3.0, observed=observed,
                                on_observed=lambda: told.append(1),
                                client_factory=lambda url: client, sleep=sleep)
    with pytest.raises(Stop):
        await reg.run("http://b:1")
    # register, poll the list, the poll fails (back off 1 s), register again
    assert client.calls == ["register", "list", "list", "register"]
    assert sleep.delays[2] == pytest.approx(1.0, rel=0.11)
    entries = book.entries()
    assert entries[CAROL.peer_id].online_sources == {"bootstrap"}
    assert entries[BOB.peer_id].online_sources == set()  # no longer listed
    assert len(told) == 2  # once per registration
    assert [(o.via, o.host, o.port) for o in observed.observations(time.time())] == [
        ("bootstrap", "198.19.0.9", 40123)]
    assert reg.dht_addrs() == [("127.0.0.1", 9004)] * 2
    await reg.unregister_all()
    await reg.close()
    assert client.calls[-2:] == ["unregister", "close"]


async def test_reregister_soon_registers_on_the_next_round() -> None:
    book = PeerBook(ME.peer_id)
    client = FakeClient([[], [], [], []])
    rounds = stopping_sleep(3)

    async def sleep(delay: float) -> None:
        if len(rounds.delays) == 1:
            reg.reregister_soon()  # our record changed after the first poll
        await rounds(delay)

    reg = BootstrapRegistration(ME, book, lambda: rec(ME), interval_s=60.0,
                                client_factory=lambda url: client, sleep=sleep)
    with pytest.raises(Stop):
        await reg.run("http://b:1")
    assert client.calls == ["register", "list", "register"]


@dataclass
class Found:
    record: ContactRecord


class FakeDht:
    def __init__(self) -> None:
        self.answer_after = 2
        self.bootstraps: list[list[tuple[str, int]]] = []
        self.stored: list[ContactRecord] = []
        self.records: dict[bytes, ContactRecord] = {}
        self.stun_answers: dict[tuple[str, int], tuple[str, int] | None] = {}

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> int:
        self.bootstraps.append(addrs)
        return len(addrs) if len(self.bootstraps) >= self.answer_after else 0

    async def set_record(self, record: ContactRecord) -> int:
        self.stored.append(record)
        return 1

    async def lookup(self, peer_id: PeerId) -> Found | None:
        r = self.records.get(peer_id.dht_id)
        return Found(r) if r else None

    async def lookup_id(self, key: bytes) -> Found | None:
        r = self.records.get(key)
        return Found(r) if r else None

    async def stun(self, addr: tuple[str, int]) -> tuple[str, int] | None:
        return self.stun_answers.get(addr)

    def contact_ids(self) -> list[tuple[bytes, str, int]]:
        return [(k, f"198.18.0.{i + 1}", 9003) for i, k in enumerate(self.records)]


class FakeCache:
    def dht_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", 7000)]


async def test_join_retries_then_publishes_and_discovers_contacts() -> None:
    dht = FakeDht()
    dht.records = {BOB.peer_id.dht_id: rec(BOB), CAROL.peer_id.dht_id: rec(CAROL)}
    book = PeerBook(ME.peer_id)
    sleep = stopping_sleep(3)
    d = DhtDiscovery(dht, book, lambda: rec(ME), manual_peers=["127.0.0.1:7001", "bad"],
                     cache=FakeCache(), sleep=sleep)
    assert d.manual == [("127.0.0.1", 7001)]
    with pytest.raises(Stop):
        await d.run()
    assert dht.bootstraps[0] == [("127.0.0.1", 7001), ("127.0.0.1", 7000)]
    assert sleep.delays[0] == 0.5  # one failed join, then the retry answered
    assert dht.stored == [rec(ME)] and d.joined
    assert set(book.entries()) == {BOB.peer_id, CAROL.peer_id}
    assert all(e.sources == {"dht"} for e in book.entries().values())
    assert await d.locate(BOB.peer_id) == rec(BOB)
    dht.records.clear()
    assert await d.locate(Identity.generate().peer_id) is None


async def test_stun_needs_two_agreeing_peers() -> None:
    dht = FakeDht()
    dht.records = {BOB.peer_id.dht_id: rec(BOB), CAROL.peer_id.dht_id: rec(CAROL)}
    observed = ObservedAddresses()
    told: list[int] = []
    d = DhtDiscovery(dht, PeerBook(ME.peer_id), lambda: rec(ME), manual_peers=[],
                     cache=FakeCache(), observed=observed, on_observed=lambda: told.append(1))
    dht.stun_answers = {("198.18.0.1", 9003): ("198.19.0.5", 41000)}
    assert await d.stun_once() == 1
    ports = {"dht": 9003}
    assert observed.advertised(["127.0.0.1"], ports, time.time()) == []
    dht.stun_answers[("198.18.0.2", 9003)] = ("198.19.0.5", 41000)
    assert await d.stun_once() == 2
    assert observed.advertised(["127.0.0.1"], ports, time.time()) == [
        ("dht", "198.19.0.5", 41000)]
    assert len(told) == 2
