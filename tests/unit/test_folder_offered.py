"""`folder_offered`: a peer offers a folder id we have not added; stored, decoded and
rendered as every notification is (`node events`), with the peer's text made safe."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import _event_line
from node.errors import ProtocolError
from node.gossip.log import EventLog
from node.notifications import NOTIFICATION_KINDS, FolderOffered, decode, render

PEER = "A" * 56


def test_round_trip_and_render_with_the_peer_label() -> None:
    note = FolderOffered(peer_id=PEER, folder_id="photos", label="Family photos")
    assert "folder_offered" in NOTIFICATION_KINDS
    back = decode(note.KIND, note.encode())
    assert back == note and back.peers() == (PEER,)
    text = back.render({PEER: "bob"})
    assert text == ("bob offers folder photos ('Family photos'); to sync it: "
                    "node folder add PATH --id photos --peer bob")
    assert render(note.KIND, note.encode()).startswith("AAAAAAA offers folder photos")


def test_peer_text_cannot_put_escapes_on_the_terminal() -> None:
    note = FolderOffered(peer_id=PEER, folder_id="x\x1b[2Jy", label="a\x07\nb")
    text = note.render()
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text
    assert "x?[2Jy" in text


def test_bad_fields_are_refused_at_decode() -> None:
    with pytest.raises(ProtocolError):
        decode("folder_offered", {"peer_id": PEER, "folder_id": 5})
    with pytest.raises(ProtocolError):
        decode("folder_offered", {"peer_id": PEER, "folder_id": "f" * 5000})
    assert "unreadable" in render("folder_offered", {"peer_id": PEER, "label": ["x"]})


def test_stored_in_the_event_log_and_shown_by_node_events(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.db")
    try:
        nid = log.emit(FolderOffered(peer_id=PEER, folder_id="docs"))
        [note] = log.notifications(nid - 1, 10)
        line = _event_line({**note.to_json(), "labels": {PEER: "carol"}})
    finally:
        log.close()
    assert "folder_offered" in line
    assert "carol offers folder docs; to sync it: node folder add PATH --id docs" in line


def test_locally_changed_renders_peer_text_safely_and_bounds_its_paths() -> None:
    from node.notifications import MAX_PATHS, FolderLocallyChanged

    note = FolderLocallyChanged("docs", ("x\x1b[2Jy.txt",) + tuple(f"f{i}" for i in range(9)), 10)
    text = render(note.KIND, note.encode())
    assert "\x1b" not in text and "x?[2Jy.txt" in text and "and 5 more" in text
    assert "node folder revert docs" in text
    too_many = {"folder": "docs", "paths": ["p"] * (MAX_PATHS + 1), "count": 1}
    with pytest.raises(ProtocolError):
        decode(FolderLocallyChanged.KIND, too_many)


def test_locally_changed_names_fit_one_stored_notification(tmp_path: Path) -> None:
    from node.folders.engine import _some_names
    from node.notifications import MAX_PATHS, FolderLocallyChanged

    long_names = [("d" * 200 + "/") * 15 + f"f{i}" for i in range(100)]  # ~3 KB each
    short = _some_names([f"n{i:03d}" for i in range(100)])
    assert len(short) == MAX_PATHS and short[0] == "n000"
    log = EventLog(tmp_path / "events.db")
    try:
        for names in (long_names, [long_names[0] * 2]):
            picked = _some_names(names)
            assert picked and len(picked) < len(names) or len(names) == 1
            log.emit(FolderLocallyChanged("docs", picked, len(names)))  # not too large
    finally:
        log.close()
