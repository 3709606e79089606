"""Notifications are typed values, one schema per kind: round trips, rendering, old rows."""

from __future__ import annotations

import pytest

from node.errors import ProtocolError
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.identity import Identity
from node.notifications import (
    KINDS,
    EventRejected,
    FileDeleted,
    FileMoved,
    FileReceived,
    FileShared,
    FileUpdated,
    FolderConflict,
    FolderLocallyChanged,
    FolderOffered,
    PeerJoined,
    PeerLeft,
    TransferFailed,
    decode,
    file_change,
    peer_label,
    render,
)

A = Identity.generate("alice", seed=b"a" * 32)
B = Identity.generate("bob", seed=b"b" * 32)
AID, BID = str(A.peer_id), str(B.peer_id)
H = "ab" * 32

SAMPLES = [
    FileShared("e1", AID, "docs", "a.txt", "created", 10, H, seq=1, lamport=1, wall_ms=5,
               via=BID),
    FileUpdated("e2", AID, "docs", "a.txt", "modified", 20, H, seq=2, local=True),
    FileDeleted("e3", AID, "docs", "a.txt", "deleted", 0, H, seq=3),
    FileMoved("e4", AID, "docs", "b.txt", "moved", 20, H, old_path="a.txt", seq=4),
    FileReceived(AID, "photo.jpg", 2_000_000, H, "/r/alice/photo.jpg", "t1"),
    FileReceived(AID, "a.txt", 10, H, "/r/alice/docs/a.txt", folder="docs", event_id="e1",
                 how="fetched"),
    TransferFailed(AID, "send", "peer went offline", ("/home/me/x.bin",), "failed", "t2"),
    TransferFailed(AID, "serve", "disk read failed", (), "failed", "t3"),
    TransferFailed(AID, "sync", "sync queue full", ("docs/a.txt",), event_id="e1"),
    PeerJoined(AID, "alice"),
    PeerLeft(AID, "alice"),
    EventRejected("bad signature", via=BID, origin=AID, seq=7, event_id="e9"),
    EventRejected("not msgpack", via=BID),
    FolderOffered(AID, "photos", "Family photos"),
    FolderConflict("docs", "a.txt", "a.sync-conflict-20260101-120000-ABCDEFG.txt", AID),
    FolderLocallyChanged("docs", ("a.txt", "sub/b.txt"), 3),
]


def test_every_kind_has_a_sample() -> None:
    assert {type(n).KIND for n in SAMPLES} == set(KINDS)


@pytest.mark.parametrize("notice", SAMPLES, ids=lambda n: type(n).__name__)
def test_round_trip_and_render_without_holes(notice) -> None:
    assert decode(notice.KIND, notice.encode()) == notice
    labels = {AID: "ally", BID: "bob"}
    for text in (notice.render(labels), notice.render()):
        assert text and "None" not in text and "  " not in text
        assert ": ." not in text and "with :" not in text and not text.endswith(": ")
        assert AID not in text  # never the 63-character id, always a label
    named = [p for p in notice.peers()
             if not (getattr(notice, "local", False) and p == getattr(notice, "origin", ""))]
    assert named or getattr(notice, "local", False)
    for peer in named:  # each peer it names is shown by its label, else its short id
        assert labels[peer] in notice.render(labels)
        assert peer_label(peer) in notice.render()


def test_the_label_is_computed_in_one_place() -> None:
    assert peer_label(AID) == A.peer_id.short
    assert peer_label(AID, {AID: "ally"}) == "ally"
    assert peer_label(AID, {AID: ""}) == A.peer_id.short
    assert peer_label("") == "an unknown peer"


def test_rows_of_older_versions_still_decode() -> None:
    # what gossip/service.py stored before: `reason` and `origin`, not `error`/`peer_id`
    old_gossip = {"event": "e1", "origin": AID, "path": "a.txt", "reason": "sync queue full"}
    note = decode("transfer_failed", old_gossip)
    assert isinstance(note, TransferFailed)
    assert note.error == "sync queue full" and note.paths == ("a.txt",)
    assert "None" not in note.render() and "sync queue full" in note.render()
    # sharing.py's rows carried the label too; it is ignored, the id names the peer
    old_share = {"transfer_id": "t", "direction": "send", "peer_id": AID, "peer": "old-alias",
                 "paths": ["/x"], "state": "failed", "error": "boom"}
    assert "old-alias" not in decode("transfer_failed", old_share).render({AID: "ally"})
    old_sync = {"id": "e", "origin": AID, "folder": "docs", "path": "a.txt", "size": 3,
                "hash": H, "how": "fetched", "local_path": "/r/a.txt", "kind": "created"}
    got = decode("file_received", old_sync)
    assert isinstance(got, FileReceived) and got.peer_id == AID and got.saved_as == "/r/a.txt"
    old_presence = {"peer": AID, "name": "alice"}
    assert decode("peer_joined", old_presence) == PeerJoined(AID, "alice")


def test_bad_rows_are_refused_and_rendered_as_such() -> None:
    with pytest.raises(ProtocolError):
        decode("bogus", {})
    with pytest.raises(ProtocolError):
        decode("file_received", {"peer_id": AID, "path": "x", "size": "big"})
    with pytest.raises(ProtocolError):
        decode("peer_left", ["not", "a", "map"])
    assert render("file_received", {"size": "big"}).startswith("(unreadable file_received")


def test_file_change_from_an_event_and_through_the_log() -> None:
    ev = ChangeEvent.create(A, folder="docs", seq=1, lamport=1, kind="moved", path="b.txt",
                            size=4, hash=bytes(32), old_path="a.txt")
    note = file_change(ev, via=B.peer_id)
    assert isinstance(note, FileMoved) and note.via == BID and note.origin == AID
    log = EventLog(":memory:")
    nid = log.emit(note)
    (stored,) = log.notifications(nid - 1)
    assert stored.kind == "file_moved" and decode(stored.kind, stored.data) == note
    assert "docs/a.txt -> docs/b.txt" in render(stored.kind, stored.data)
    log.close()
