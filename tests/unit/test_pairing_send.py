"""One-shot sends, the pure parts: the in-memory channel grant (expiry, wrong key, other
service), the sender's offer grant (only offered files, exactly that key), the offer's
validation, the send purpose's separation from invitations, and --dir checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.errors import ConfigError, PeerNotTrusted, ProtocolError
from node.identity import Identity
from node.pairing import WrongCode
from node.pairing.code import make_code
from node.pairing.protocol import SIDE_A, SIDE_B, PakeSide, open_box, seal
from node.pairing.send import (
    MAX_OFFER_FILES,
    SEND_APP_ID,
    SERVICE,
    OfferedFile,
    OneShotHello,
    OneShotService,
    SendGrant,
    SendOffer,
    SendState,
    offer_fits,
)
from node.peering import ChannelGrants, Peering
from node.transfer.session import TransferResult, TransferState

ALICE = Identity.generate("alice", seed=bytes(32))
BOB = Identity.generate("bob", seed=bytes([1]) * 32)
EVE = Identity.generate("eve", seed=bytes([2]) * 32)
ROOT = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoTrust:
    def is_trusted(self, peer: Any) -> bool:
        return False


def offer(*files: OfferedFile) -> SendOffer:
    return SendOffer(b"\x07" * 16, files or (OfferedFile("a.bin", 10, ROOT),))


# -- ChannelGrants ------------------------------------------------------------------------

def test_grant_allows_exactly_its_key_and_service_until_it_expires() -> None:
    clock = Clock()
    grants = ChannelGrants(clock)
    g = grants.add(BOB.peer_id, SERVICE, 30)
    assert grants.allows(BOB.peer_id, SERVICE)
    assert grants.allows(BOB.peer_id, None)  # the handshake: the service comes next
    assert not grants.allows(BOB.peer_id, "transfer")
    assert not grants.allows(BOB.peer_id, "fetch")
    assert not grants.allows(EVE.peer_id, SERVICE)
    clock.now += 29.9
    assert grants.allows(BOB.peer_id, SERVICE)
    clock.now += 0.2
    assert not grants.allows(BOB.peer_id, SERVICE) and len(grants) == 0
    g = grants.add(BOB.peer_id, SERVICE, 30)
    grants.withdraw(g)
    grants.withdraw(g)  # twice is harmless
    assert not grants.allows(BOB.peer_id, SERVICE)
    with pytest.raises(ValueError):
        grants.add(BOB.peer_id, SERVICE, 0)


def test_peering_admits_a_granted_untrusted_key_for_its_service_only() -> None:
    async def locate(_peer: Any) -> None:
        return None

    peering = Peering(ALICE, NoTrust(), host="127.0.0.1", ports={}, transports=["tcp"],
                      locate=locate)  # type: ignore[arg-type]
    with pytest.raises(PeerNotTrusted):
        peering.authorize(BOB.peer_id)
    g = peering.grants.add(BOB.peer_id, SERVICE, 10)
    peering.authorize(BOB.peer_id)
    peering.authorize(BOB.peer_id, SERVICE)
    for service in ("transfer", "fetch", "gossip", "ping"):
        with pytest.raises(PeerNotTrusted):
            peering.authorize(BOB.peer_id, service)
    with pytest.raises(PeerNotTrusted):
        peering.authorize(EVE.peer_id, SERVICE)
    peering.grants.withdraw(g)
    with pytest.raises(PeerNotTrusted):
        peering.authorize(BOB.peer_id, SERVICE)


# -- SendGrant ------------------------------------------------------------------------------

def make_grant(tmp: Path) -> SendGrant:
    o = offer(OfferedFile("a.bin", 10, ROOT), OfferedFile("d/b.txt", 3, bytes(32)))
    return SendGrant(o, BOB.peer_id, {"a.bin": (tmp, tmp / "a.bin"),
                                      "d/b.txt": (tmp, tmp / "d" / "b.txt")})


def test_send_grant_serves_only_offered_paths_with_their_hash(tmp_path: Path) -> None:
    g = make_grant(tmp_path)
    assert g.resolve("a.bin", ROOT) == (tmp_path, tmp_path / "a.bin")
    assert g.resolve("d/b.txt", bytes(32)) == (tmp_path, tmp_path / "d" / "b.txt")
    assert g.resolve("a.bin", None) is None  # a fetch must name the offered content
    assert g.resolve("a.bin", bytes(32)) is None  # other content under the offered name
    assert g.resolve("c.bin", ROOT) is None
    assert g.resolve("../a.bin", ROOT) is None


def test_send_grant_refuses_another_key_or_offer_and_ends_once(tmp_path: Path) -> None:
    g = make_grant(tmp_path)
    good = OneShotHello(g.offer.offer_id, True)
    assert g.check_hello(BOB.peer_id, good) == ""
    assert "another key" in g.check_hello(EVE.peer_id, good)
    assert "no such offer" in g.check_hello(BOB.peer_id, OneShotHello(b"\x01" * 16, True))
    g.on_hello(False)
    assert g.state is SendState.DECLINED and g.ended
    assert "declined" in g.check_hello(BOB.peer_id, good)


def test_send_grant_is_done_when_every_offered_file_was_served(tmp_path: Path) -> None:
    from node.transfer.session import FileResult

    g = make_grant(tmp_path)
    g.on_hello(True)
    part = TransferResult("t", [FileResult("a.bin", 10, ROOT.hex(), None)], 10, 0,
                          TransferState.DONE)
    g.on_served(part)
    assert g.state is SendState.SENDING
    g.on_served(TransferResult("t", [FileResult("d/b.txt", 3, "", None)], 3, 0,
                               TransferState.DONE))
    assert g.state is SendState.DONE
    g.on_broken("late")
    assert g.state is SendState.DONE


# -- the offer on the wire ------------------------------------------------------------------

def test_offer_round_trips_and_bad_offers_are_refused() -> None:
    o = offer(OfferedFile("a.bin", 10, ROOT), OfferedFile("dir/c d.txt", 0, ROOT))
    assert SendOffer.from_wire(o.to_wire()) == o
    wire = o.to_wire()
    bad: list[Any] = [
        None, [2, wire[1], wire[2]], [1, b"short", wire[2]], [1, wire[1], []],
        [1, wire[1], [["../x", 1, ROOT]]], [1, wire[1], [["/etc/x", 1, ROOT]]],
        [1, wire[1], [["a", -1, ROOT]]], [1, wire[1], [["a", True, ROOT]]],
        [1, wire[1], [["a", 1, b"x" * 31]]], [1, wire[1], [["a", 1, ROOT], ["a", 2, ROOT]]],
        [1, wire[1], [["a", 1]]], [1, wire[1], [[b"a", 1, ROOT]]],
        [1, wire[1], [["\x1b[2Jcleared.txt", 1, ROOT]]],  # a terminal escape in a name
        [1, wire[1], [["\x9b2Jcleared.txt", 1, ROOT]]],  # a C1 CSI, one character
        [1, wire[1], [["x\x85y.txt", 1, ROOT]]],  # a C1 next line
        [1, wire[1], [["\u202egnp.exe", 1, ROOT]]],  # reads "exe.png" at the prompt
        [1, wire[1], [["d\u2066/a.txt", 1, ROOT]]],  # a bidi isolate in a folder name
        [1, wire[1], [[".a.0123456789abcdef.p2pfs-part", 1, ROOT]]],  # our own files
        [1, wire[1], [[f"f{i}", 1, ROOT] for i in range(MAX_OFFER_FILES + 1)]],
    ]
    for obj in bad:
        with pytest.raises(ProtocolError):
            SendOffer.from_wire(obj)


def test_a_big_offer_does_not_fit_one_box() -> None:
    small = offer()
    assert offer_fits(small, None, "alice", ALICE.public_key)
    many = offer(*[OfferedFile(f"{'n' * 60}{i}.bin", i, ROOT) for i in range(40)])
    assert not offer_fits(many, None, "alice", ALICE.public_key)


def test_an_invitation_code_fails_as_a_send_code() -> None:
    code = make_code(7)
    a = PakeSide(code, SIDE_A, app_id=SEND_APP_ID)
    b = PakeSide(code, SIDE_B)  # `node accept` of a send code
    ka, kb = a.finish(b.outbound), b.finish(a.outbound)
    with pytest.raises(WrongCode):
        open_box(kb, seal(ka, ALICE, "alice", None, offer().to_wire()))
    # the same purpose on both sides opens, and carries the offer
    a, b = PakeSide(code, SIDE_A, app_id=SEND_APP_ID), PakeSide(code, SIDE_B, app_id=SEND_APP_ID)
    ka, kb = a.finish(b.outbound), b.finish(a.outbound)
    got = open_box(kb, seal(ka, ALICE, "alice", None, offer().to_wire()))
    assert got.peer_id == ALICE.peer_id and SendOffer.from_wire(got.extra) == offer()


# -- where the files land ----------------------------------------------------------------------

class FakePeering:
    def register(self, *_a: Any) -> None:
        pass


def service(tmp: Path) -> OneShotService:
    home = tmp / "home"

    def check(path: Path, what: str) -> None:
        if path == home or home in path.parents or path in home.parents:
            raise ConfigError(f"{what} {path} is the node's home")

    return OneShotService(None, FakePeering(), received_dir=home / "received",  # type: ignore
                          check_path=check, notify=lambda _n: None)


def test_receive_dir_default_and_checks(tmp_path: Path) -> None:
    svc = service(tmp_path)
    base, label = svc.target(None, ALICE.peer_id)
    assert base == tmp_path / "home" / "received" and label == f"from-{ALICE.peer_id.short}"
    assert svc.target(str(tmp_path / "inbox"), ALICE.peer_id) == (tmp_path, "inbox")
    for bad in ("relative/dir", str(tmp_path / "home"), str(tmp_path / "home" / "x"), "/",
                str(tmp_path / "bad:name")):
        with pytest.raises(ConfigError):
            svc.target(bad, ALICE.peer_id)


# -- a used or expired send code says what to do for a send --------------------------------

async def test_a_used_send_code_advises_a_new_send_not_an_invitation(tmp_path: Path) -> None:
    from node.pairing import CodeExpired, CodeUsed

    class Refusing:
        identity = ALICE

        def current_record(self) -> None:
            return None

        async def exchange_as_accepter(self, *_a: Any, **_k: Any) -> Any:
            raise CodeUsed("this code was already used, or never existed (each code works "
                           "once); make a new one with `node invite`")

        async def exchange_as_inviter(self, *_a: Any, **_k: Any) -> Any:
            raise CodeExpired("this code has expired; make a new one with `node invite`")

    async def quiet(_e: dict[str, Any]) -> None:
        return None

    svc = service(tmp_path)
    svc.pairing = Refusing()  # type: ignore[assignment]
    with pytest.raises(CodeUsed) as used:
        await svc.receive_offer(str(make_code(7)), emit=quiet)
    assert "node invite" not in str(used.value) and "node send" in str(used.value)
    src = tmp_path / "a.txt"
    src.write_text("a")
    with pytest.raises(CodeExpired) as expired:
        await svc.send([src], emit=quiet)
    assert "node invite" not in str(expired.value) and "node send" in str(expired.value)


def test_a_sender_refuses_a_name_every_receiver_would_refuse(tmp_path: Path) -> None:
    svc = service(tmp_path)
    odd = tmp_path / "\u202egnp.exe"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="text-direction"):
        svc._prepare([odd])
    fine = tmp_path / "caf\u00e9 \U0001f600.txt"
    fine.write_text("x")
    offer, _ = svc._prepare([fine])
    assert SendOffer.from_wire(offer.to_wire()) == offer
