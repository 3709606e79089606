"""Peering.revoke over real tcp channels on 127.0.0.1: trust withdrawn closes every
open channel with the peer (opened by either side) at once, tells the services
first, and nothing new opens."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.channel import SecureChannel
from node.contact import ContactRecord
from node.errors import ChannelClosed, PeerNotTrusted
from node.identity import Identity, PeerId
from node.peering import Peering
from node.trust import TrustStore

REVOKE_LIMIT_S = 1.0


class Side:
    def __init__(self, tmp_path: Path, identity: Identity,
                 records: dict[PeerId, ContactRecord]) -> None:
        self.identity = identity
        self.trust = TrustStore(tmp_path / f"trust-{identity.name}.db")
        self.served: list[SecureChannel] = []
        self.told: list[tuple[PeerId, str]] = []

        async def locate(peer: PeerId) -> ContactRecord | None:
            return records.get(peer)

        self.peering = Peering(identity, self.trust, host="127.0.0.1", ports={"tcp": 0},
                               transports=["tcp"], locate=locate)
        self.peering.register("hold", self._hold)
        self.peering.on_revoke(lambda peer, err: self.told.append((peer, str(err))))

    async def _hold(self, channel: SecureChannel) -> None:
        self.served.append(channel)
        with contextlib.suppress(ChannelClosed):
            while True:
                await channel.recv()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    records: dict[PeerId, ContactRecord] = {}
    a = Side(tmp_path, Identity.generate("alice"), records)
    b = Side(tmp_path, Identity.generate("bob"), records)
    a.trust.trust(b.identity.peer_id, "bob")
    b.trust.trust(a.identity.peer_id, "alice")
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


async def _until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_revoke_closes_channels_opened_by_either_side(pair: tuple[Side, Side]) -> None:
    a, b = pair
    bob, alice = b.identity.peer_id, a.identity.peer_id
    ours = await a.peering.connect(bob, "hold")  # alice -> bob
    theirs = await b.peering.connect(alice, "hold")  # bob -> alice
    await _until(lambda: len(a.served) == 1 and len(b.served) == 1)
    assert len(a.peering.open_channels(bob)) == 2

    a.trust.untrust(bob)
    started = time.monotonic()
    closed = await a.peering.revoke(bob)
    took = time.monotonic() - started
    assert closed == 2 and took < REVOKE_LIMIT_S, (closed, took)
    assert [(p, "not trusted" in why) for p, why in a.told] == [(bob, True)]
    assert a.peering.open_channels(bob) == []
    assert ours.closed and a.served[0].closed
    # bob's ends see the close at once, not after an idle timeout
    for end in (theirs, b.served[0]):
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(end.recv(), 2.0)
    # and nothing new opens, from either side
    with pytest.raises(PeerNotTrusted):
        await a.peering.connect(bob, "hold")
    with pytest.raises(PeerNotTrusted):
        await b.peering.connect(alice, "hold")


async def test_revoke_leaves_other_peers_alone(pair: tuple[Side, Side], tmp_path: Path) -> None:
    a, b = pair
    ours = await a.peering.connect(b.identity.peer_id, "hold")
    stranger = Identity.generate("carol").peer_id
    assert await a.peering.revoke(stranger) == 0
    assert not ours.closed and a.told == [(stranger, a.told[0][1])]
    await ours.send(b"still here")
    await _until(lambda: len(b.served) == 1)
