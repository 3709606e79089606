"""One-shot channel grants over real tcp channels on 127.0.0.1: a key nobody trusts may
open exactly the granted service while the grant lasts, and nothing else; the trust
store stays empty throughout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.channel import SecureChannel
from node.contact import ContactRecord
from node.errors import ChannelClosed, P2PError, PeerNotTrusted
from node.identity import Identity, PeerId
from node.peering import Peering
from node.trust import TrustStore


class Side:
    def __init__(self, tmp_path: Path, identity: Identity,
                 records: dict[PeerId, ContactRecord]) -> None:
        self.identity = identity
        self.trust = TrustStore(tmp_path / f"trust-{identity.name}.db")
        self.served: list[str] = []

        async def locate(peer: PeerId) -> ContactRecord | None:
            return records.get(peer)

        self.peering = Peering(identity, self.trust, host="127.0.0.1", ports={"tcp": 0},
                               transports=["tcp"], locate=locate)
        for service in ("oneshot", "transfer"):
            self.peering.register(service, self._serve(service))

    def _serve(self, service: str):  # type: ignore[no-untyped-def]
        async def handler(channel: SecureChannel) -> None:
            self.served.append(service)
            with contextlib.suppress(ChannelClosed):
                await channel.send(b"hello from " + service.encode())
                await channel.recv()

        return handler


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    records: dict[PeerId, ContactRecord] = {}
    a = Side(tmp_path, Identity.generate("alice"), records)
    b = Side(tmp_path, Identity.generate("bob"), records)
    try:
        for side in (a, b):
            ports = await side.peering.start()
            records[side.identity.peer_id] = ContactRecord.create(
                side.identity, ["127.0.0.1"], ports, 1)
        yield a, b
    finally:
        for side in (a, b):
            await side.peering.stop()
            side.trust.close()


async def test_a_granted_key_opens_its_service_only(pair: tuple[Side, Side]) -> None:
    a, b = pair
    alice, bob = a.identity.peer_id, b.identity.peer_id
    with pytest.raises(PeerNotTrusted):  # no grant yet: refused before any dial
        await b.peering.connect(alice, "oneshot")
    a.peering.grants.add(bob, "oneshot", 10)
    b_grant = b.peering.grants.add(alice, "oneshot", 10)
    channel = await b.peering.connect(alice, "oneshot")
    try:
        assert await asyncio.wait_for(channel.recv(), 5) == b"hello from oneshot"
    finally:
        await channel.close()
    b.peering.grants.withdraw(b_grant)
    # bob's side would refuse "transfer" itself; let it try, as a hostile bob would
    b.peering.grants.add(alice, "transfer", 10)
    sneaky = await b.peering.connect(alice, "transfer")
    with pytest.raises((ChannelClosed, P2PError)):
        await asyncio.wait_for(sneaky.recv(), 5)
    await sneaky.close()
    assert a.served == ["oneshot"]  # the transfer handler never ran
    assert a.trust.all() == [] and b.trust.all() == []


async def test_an_expired_grant_admits_nobody(pair: tuple[Side, Side]) -> None:
    a, b = pair
    alice, bob = a.identity.peer_id, b.identity.peer_id
    a.peering.grants.add(bob, "oneshot", 0.2)
    b.peering.grants.add(alice, "oneshot", 10)
    deadline = time.monotonic() + 5
    while a.peering.grants.allows(bob, "oneshot"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    with pytest.raises((PeerNotTrusted, ChannelClosed)):
        channel = await b.peering.connect(alice, "oneshot")
        await asyncio.wait_for(channel.recv(), 5)
    assert a.served == []
