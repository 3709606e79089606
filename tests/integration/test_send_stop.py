"""One-shot sends over real tcp channels on 127.0.0.1, with the pairing exchange faked
(the offer goes straight to the receiver): a `node send` that goes away mid-transfer
(Ctrl-C: its control connection breaks) stops the bytes, and an offer is served on one
channel only."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node.contact import ContactRecord
from node.errors import P2PError
from node.identity import Identity, PeerId
from node.pairing.send import (
    SERVICE,
    OneShotHello,
    OneShotReady,
    OneShotService,
    PendingReceive,
    SendOffer,
)
from node.peering import Peering
from node.trust import TrustStore
from node.wire import decode_message

MIB = 1 << 20


class FakePairing:
    """The exchange is done at once: the offer is handed to the test instead of a box."""

    def __init__(self, identity: Identity, other: Identity,
                 records: dict[PeerId, ContactRecord]) -> None:
        self.identity, self.other, self.records = identity, other, records
        self.offers: asyncio.Queue[Any] = asyncio.Queue()
        self.other_offers: asyncio.Queue[Any] = asyncio.Queue()  # what the "box" brings

    def current_record(self) -> ContactRecord | None:
        return self.records.get(self.identity.peer_id)

    async def exchange_as_accepter(self, *_a: Any, **_kw: Any) -> Any:
        extra = await self.other_offers.get()
        return SimpleNamespace(offer=SimpleNamespace(
            peer_id=self.other.peer_id, name=self.other.name, extra=extra,
            record=self.records[self.other.peer_id]))

    async def exchange_as_inviter(self, *, extra: Any, **_kw: Any) -> Any:
        await self.offers.put(extra)
        return SimpleNamespace(offer=SimpleNamespace(peer_id=self.other.peer_id,
                                                     name=self.other.name))


class Side:
    def __init__(self, tmp: Path, me: Identity, other: Identity,
                 records: dict[PeerId, ContactRecord]) -> None:
        self.identity = me
        self.trust = TrustStore(tmp / f"trust-{me.name}.db")

        async def locate(peer: PeerId) -> ContactRecord | None:
            return records.get(peer)

        self.peering = Peering(me, self.trust, host="127.0.0.1", ports={"tcp": 0},
                               transports=["tcp"], locate=locate)
        self.pairing = FakePairing(me, other, records)
        self.svc = OneShotService(self.pairing, self.peering,  # type: ignore[arg-type]
                                  received_dir=tmp / f"received-{me.name}",
                                  check_path=lambda _p, _w: None, notify=lambda _n: None)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    records: dict[PeerId, ContactRecord] = {}
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    a, b = Side(tmp_path, alice, bob, records), Side(tmp_path, bob, alice, records)
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


def pending(a: Side, offer_wire: Any) -> PendingReceive:
    record = a.pairing.current_record()
    assert record is not None
    return PendingReceive(a.identity.peer_id, "alice", record, SendOffer.from_wire(offer_wire),
                          asyncio.get_running_loop().time() + 100)


async def quiet(_event: dict[str, Any]) -> None:
    return None


async def test_a_send_whose_cli_went_away_stops_serving(pair: tuple[Side, Side],
                                                        tmp_path: Path) -> None:
    a, b = pair
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(64 * MIB))

    async def sender_cli(event: dict[str, Any]) -> None:
        if event.get("type") == "progress":  # the user pressed Ctrl-C once bytes flowed
            raise ConnectionResetError("the CLI went away")

    send = asyncio.ensure_future(a.svc.send([src], emit=sender_cli))
    try:
        offer_wire = await asyncio.wait_for(a.pairing.offers.get(), 30)
        b.svc._clock = asyncio.get_running_loop().time
        b.svc._receives["s"] = pending(a, offer_wire)
        with pytest.raises(P2PError) as broke:
            await asyncio.wait_for(
                b.svc.receive_accept("s", accept=True, target=str(tmp_path / "in"),
                                     emit=quiet), 30)
        # the receiver is told the sender stopped, not that its own folder "in" did
        assert "in aborted" not in str(broke.value), broke.value
        assert f"sender {a.identity.peer_id.short} stopped" in str(broke.value), broke.value
        with pytest.raises((P2PError, ConnectionError)):
            await asyncio.wait_for(send, 10)
    finally:
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
    assert not (tmp_path / "in" / "big.bin").exists()
    assert not a.peering.grants.allows(b.identity.peer_id, SERVICE)


async def test_an_offer_is_served_on_one_channel_only(pair: tuple[Side, Side],
                                                      tmp_path: Path) -> None:
    a, b = pair
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1000)
    send = asyncio.ensure_future(a.svc.send([src], emit=quiet))
    try:
        offer = SendOffer.from_wire(await asyncio.wait_for(a.pairing.offers.get(), 30))
        b.peering.grants.add(a.identity.peer_id, SERVICE, 30)
        first = await b.peering.connect(a.identity.peer_id, SERVICE)
        second = await b.peering.connect(a.identity.peer_id, SERVICE)
        try:
            await first.send(OneShotHello(offer.offer_id, True).encode())
            ready = decode_message(await asyncio.wait_for(first.recv(), 10),
                                   expect=(OneShotReady,))
            assert ready.ok
            await second.send(OneShotHello(offer.offer_id, True).encode())
            again = decode_message(await asyncio.wait_for(second.recv(), 10),
                                   expect=(OneShotReady,))
            assert not again.ok and "another channel" in again.reason
        finally:
            await first.close()
            await second.close()
    finally:
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)


async def test_a_receive_whose_cli_went_away_stops_fetching(pair: tuple[Side, Side],
                                                            tmp_path: Path) -> None:
    a, b = pair
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(64 * MIB))

    async def receiver_cli(event: dict[str, Any]) -> None:
        if event.get("type") == "progress":  # the user pressed Ctrl-C once bytes flowed
            raise ConnectionResetError("the CLI went away")

    send = asyncio.ensure_future(a.svc.send([src], emit=quiet))
    try:
        offer_wire = await asyncio.wait_for(a.pairing.offers.get(), 30)
        b.svc._clock = asyncio.get_running_loop().time
        b.svc._receives["s"] = pending(a, offer_wire)
        with pytest.raises(P2PError):
            await asyncio.wait_for(
                b.svc.receive_accept("s", accept=True, target=str(tmp_path / "in"),
                                     emit=receiver_cli), 30)
        with pytest.raises(P2PError):  # the sender is told it broke: a new code resumes
            await asyncio.wait_for(send, 10)
    finally:
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
    assert not (tmp_path / "in" / "big.bin").exists()


async def test_a_receive_interrupted_before_its_prompt_declines_at_once(
        pair: tuple[Side, Side], tmp_path: Path) -> None:
    """Ctrl-C while the codes meet: the sender hears "declined" now, not after
    ACCEPT_TIMEOUT_S of waiting for an answer nobody will give."""
    from node.pairing.code import make_code
    from node.pairing.send import SendDeclined

    a, b = pair
    src = tmp_path / "small.bin"
    src.write_bytes(b"y" * 1000)

    async def gone(event: dict[str, Any]) -> None:
        if event.get("type") == "offered":
            raise ConnectionResetError("the CLI went away")

    send = asyncio.ensure_future(a.svc.send([src], emit=quiet))
    try:
        await b.pairing.other_offers.put(await asyncio.wait_for(a.pairing.offers.get(), 30))
        with pytest.raises(ConnectionError):
            await b.svc._cmd_receive_offer({"code": str(make_code(7))}, gone)
        with pytest.raises(SendDeclined):
            await asyncio.wait_for(send, 10)
    finally:
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
    assert b.svc._receives == {}


async def test_a_bad_dir_is_refused_before_the_code_is_used(pair: tuple[Side, Side],
                                                            tmp_path: Path) -> None:
    from node.errors import ConfigError, LocalIOError
    from node.pairing.code import make_code

    a, b = pair
    a_file = tmp_path / "a.txt"
    a_file.write_text("a")
    with pytest.raises(LocalIOError, match="not a folder"):  # before any exchange
        await asyncio.wait_for(b.svc._cmd_receive_offer(
            {"code": str(make_code(7)), "dir": str(a_file)}, quiet), 5)
    with pytest.raises(ConfigError):
        await asyncio.wait_for(b.svc._cmd_receive_offer(
            {"code": str(make_code(7)), "dir": "relative/dir"}, quiet), 5)


async def test_a_dir_gone_bad_after_the_prompt_declines_to_the_sender(
        pair: tuple[Side, Side], tmp_path: Path) -> None:
    """The code is spent by then: the sender hears "declined" at once (it waited 5 min)."""
    from node.errors import LocalIOError
    from node.pairing.send import SendDeclined

    a, b = pair
    src = tmp_path / "small.bin"
    src.write_bytes(b"z" * 1000)
    send = asyncio.ensure_future(a.svc.send([src], emit=quiet))
    try:
        offer_wire = await asyncio.wait_for(a.pairing.offers.get(), 30)
        b.svc._clock = asyncio.get_running_loop().time
        b.svc._receives["s"] = pending(a, offer_wire)
        with pytest.raises(LocalIOError, match="not a folder"):
            await b.svc.receive_accept("s", accept=True, target=str(src), emit=quiet)
        with pytest.raises(SendDeclined):
            await asyncio.wait_for(send, 10)
    finally:
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
