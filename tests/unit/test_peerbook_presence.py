"""`online` in the peer book: heard from the peer itself, now (issue 11 item 7)."""

from __future__ import annotations

import time

from node.contact import ContactRecord
from node.identity import Identity
from node.peerbook import SHARE_TARGET_SEEN_S, PeerBook


def _book_with_peer() -> tuple[PeerBook, Identity]:
    me, peer = Identity.generate(), Identity.generate()
    book = PeerBook(me.peer_id)
    assert book.add(ContactRecord.create(peer, ["127.0.0.1"], {"tcp": 9}, 1), "bootstrap")
    return book, peer


def test_a_peer_listed_second_hand_is_known_but_not_online() -> None:
    # a bootstrap listing (or DHT lookup) just now says nothing about whether the peer
    # runs: the server lists it until its registration expires, minutes after it stopped
    book, peer = _book_with_peer()
    book.set_online(peer.peer_id, "bootstrap", True)  # as discovery/bootstrap.py does
    entry = book.entries()[peer.peer_id]
    assert entry.to_json()["online"] is False
    assert entry.to_json()["last_seen"] > time.time() - 5
    # ...but it stays a target of `node share` without --to for a while
    assert entry.seen_within(SHARE_TARGET_SEEN_S)


def test_online_while_a_presence_source_or_a_channel_is_live() -> None:
    book, peer = _book_with_peer()
    book.set_online(peer.peer_id, "gossip", True)
    assert book.entries()[peer.peer_id].to_json()["online"] is True
    book.set_online(peer.peer_id, "gossip", False)  # heartbeat timed out, or a goodbye
    assert book.entries()[peer.peer_id].to_json()["online"] is False
    assert book.entries()[peer.peer_id].to_json(live=True)["online"] is True


def test_a_peer_not_seen_for_long_is_no_share_target() -> None:
    book, peer = _book_with_peer()
    entry = book.entries()[peer.peer_id]
    assert not entry.seen_within(SHARE_TARGET_SEEN_S, now=time.time() + SHARE_TARGET_SEEN_S + 1)
