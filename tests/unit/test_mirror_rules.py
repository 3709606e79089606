"""The --share mirror's pure rules (node/folders/mirror.py): no file system, no sockets.

The driver on real temp dirs: tests/integration/test_mirror_received.py.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import IntegrityError, ProtocolError
from node.folders import mirror
from node.folders.mirror import MirrorOutcome, Step
from node.gossip.events import ChangeEvent
from node.identity import Identity

ALICE = Identity.generate(name="alice", seed=b"\x0a" * 32)
BOB = Identity.generate(name="bob", seed=b"\x0c" * 32)
ME = Identity.generate(name="me", seed=b"\x0b" * 32)


def h(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def ev(kind: str, path: str, data: bytes | None = None, *, seq: int = 1, old_path: str = "",
       origin: Identity = ALICE, folder: str = "docs") -> ChangeEvent:
    return ChangeEvent.create(origin, folder=folder, seq=seq, lamport=seq, kind=kind,
                              path=path, old_path=old_path,
                              size=len(data) if data is not None else 0,
                              hash=h(data) if data is not None else b"")


# -- screen ------------------------------------------------------------------------
def test_screen_skips_our_own_events_and_stale_ones() -> None:
    mine = ev("created", "f", b"x", origin=ME)
    assert mirror.screen(mine, self_id=ME.peer_id, last_seq=0) is MirrorOutcome.SKIPPED
    e = ev("modified", "f", b"x", seq=5)
    assert mirror.screen(e, self_id=ME.peer_id, last_seq=0) is None
    assert mirror.screen(e, self_id=ME.peer_id, last_seq=4) is None
    assert mirror.screen(e, self_id=ME.peer_id, last_seq=5) is MirrorOutcome.STALE  # replay
    assert mirror.screen(e, self_id=ME.peer_id, last_seq=9) is MirrorOutcome.STALE


def test_a_move_settles_both_of_its_paths() -> None:
    move = ev("moved", "b/y", b"v", old_path="a/x", seq=3)
    assert mirror.applied_keys(move) == ((ALICE.peer_id.key, "docs", "b/y"),
                                         (ALICE.peer_id.key, "docs", "a/x"))
    assert mirror.applied_keys(ev("deleted", "a/x")) == ((ALICE.peer_id.key, "docs", "a/x"),)
    # the key is per origin and folder: the same path of another peer is another copy
    assert mirror.event_key(ev("created", "f", b"1")) != mirror.event_key(
        ev("created", "f", b"1", origin=BOB))
    assert mirror.event_key(ev("created", "f", b"1")) != mirror.event_key(
        ev("created", "f", b"1", folder="music"))


def test_kinds() -> None:
    assert [mirror.is_content(ev(k, "f", b"1")) for k in ("created", "modified", "shared")] \
        == [True, True, True]
    assert not mirror.is_content(ev("deleted", "f"))
    assert not mirror.is_content(ev("moved", "g", b"1", old_path="f"))
    assert mirror.is_one_off(ev("shared", "f", b"1"))
    assert not mirror.is_one_off(ev("created", "f", b"1"))


# -- steps -------------------------------------------------------------------------
def test_content_is_kept_only_when_the_target_holds_the_announced_hash() -> None:
    assert mirror.content_step(h(b"v1"), h(b"v1")) is Step.KEEP
    assert mirror.content_step(h(b"v2"), h(b"v1")) is Step.FILL  # ours is versioned first
    assert mirror.content_step(h(b"v1"), None) is Step.FILL


def test_delete_versions_what_we_hold() -> None:
    assert mirror.delete_step(True) is Step.VERSION
    assert mirror.delete_step(False) is Step.ABSENT


def test_move_renames_only_the_moved_content() -> None:
    assert mirror.move_step(h(b"v"), h(b"v")) is Step.RENAME  # no transfer
    assert mirror.move_step(h(b"v"), h(b"other")) is Step.REPLACE_OLD  # ours kept as version
    assert mirror.move_step(h(b"v"), None) is Step.FILL  # no old copy: fill the new path


def test_check_content_refuses_what_was_not_announced() -> None:
    e = ev("created", "g", b"announced")
    mirror.check_content(e, h(b"announced"))
    with pytest.raises(IntegrityError, match="does not match"):
        mirror.check_content(e, h(b"tampered"))


# -- batches -----------------------------------------------------------------------
def test_must_flush_keeps_the_order_of_events_per_path() -> None:
    created = ev("created", "f", b"1")
    pending = {mirror.event_key(created)}
    # another file's content joins the batch
    assert not mirror.must_flush(ev("created", "g", b"2"), pending, batching=True)
    # a second event for a pending path, a delete or a move waits for the batch
    assert mirror.must_flush(ev("modified", "f", b"3", seq=2), pending, batching=True)
    assert mirror.must_flush(ev("deleted", "g"), pending, batching=True)
    assert mirror.must_flush(ev("moved", "h", b"2", old_path="g"), pending, batching=True)
    # a full batch goes out first; without fetch_many every event is applied alone
    assert mirror.must_flush(ev("created", "g", b"2"), pending, batching=True, max_batch=1)
    assert mirror.must_flush(ev("created", "g", b"2"), set(), batching=False)


def test_fetch_groups_one_session_per_origin_and_folder_in_order() -> None:
    items = [(ev("created", "a", b"1"), 1), (ev("created", "b", b"2", origin=BOB), 2),
             (ev("created", "c", b"3"), 3), (ev("created", "d", b"4", folder="music"), 4)]
    groups = mirror.fetch_groups(items)
    assert list(groups) == [(ALICE.peer_id, "docs"), (BOB.peer_id, "docs"),
                            (ALICE.peer_id, "music")]
    assert [x for _e, x in groups[(ALICE.peer_id, "docs")]] == [1, 3]


# -- paths -------------------------------------------------------------------------
def test_paths_of_copies_and_versions() -> None:
    assert mirror.fetch_rel("docs", "a/x.txt") == "docs/a/x.txt"
    assert mirror.mirror_rel("alice", "docs", "a/x.txt") == PurePosixPath("alice/docs/a/x.txt")
    assert mirror.version_stamp(0.0, 1_234_567_890_123) == "19700101-000000-567890123"
    assert mirror.version_rel("alice", "docs", "a/x.txt", "19700101-000000-000000001") == \
        PurePosixPath("alice/.p2pfs-versions/docs/a/x.txt~19700101-000000-000000001")
    for bad in ("../x", "/etc/passwd", "a/../../x", "x.p2pfs-part", ""):
        with pytest.raises(ProtocolError):
            mirror.mirror_rel("alice", "docs", bad)
        with pytest.raises(ProtocolError):
            mirror.version_rel("alice", "docs", bad, "s")


def test_shared_target_names_only_a_file_inside_a_share() -> None:
    labels = {"docs", "music"}
    assert mirror.shared_target(labels, "docs/a/x.txt") == ("docs", PurePosixPath("a/x.txt"))
    assert mirror.shared_target(labels, "music/song.mp3") == ("music", PurePosixPath("song.mp3"))
    for refused in ("docs", "other/x.txt", "../docs/x", "docs/../x", "/docs/x", "",
                    "docs/.x.p2pfs-part"):
        assert mirror.shared_target(labels, refused) is None, refused


@given(st.text(max_size=80))
def test_shared_target_never_raises_and_never_escapes(rel: str) -> None:
    got = mirror.shared_target({"docs"}, rel)
    if got is not None:
        label, inner = got
        assert label == "docs" and not inner.is_absolute() and ".." not in inner.parts


# -- notifications -----------------------------------------------------------------
def test_notes() -> None:
    e = ev("created", "a/x.txt", b"v1", seq=7)
    note = mirror.received_note(e, MirrorOutcome.COPIED, "/r/alice/docs/a/x.txt")
    assert note is not None and (note.how, note.folder, note.path, note.saved_as) == (
        "copied", "docs", "a/x.txt", "/r/alice/docs/a/x.txt")
    assert note.hash == h(b"v1").hex() and note.event_id == e.id.hex()
    for quiet in (MirrorOutcome.MOVED, MirrorOutcome.VERSIONED, MirrorOutcome.UNCHANGED,
                  MirrorOutcome.STALE, MirrorOutcome.SKIPPED):
        assert mirror.received_note(e, quiet, "x") is None
    failed = mirror.failed_note(e, "peer offline")
    assert (failed.direction, failed.paths, failed.error) == (
        "sync", ("docs/a/x.txt",), "peer offline")
