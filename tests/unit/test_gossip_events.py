"""Change events and heartbeats: signing, ids, bounds, path validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import ProtocolError
from node.gossip.events import (
    MAX_PATH_BYTES,
    ChangeEvent,
    Heartbeat,
    validate_folder,
    validate_rel_path,
)
from node.identity import Identity
from node.wire import packb

ME = Identity.generate(name="me", seed=b"\x01" * 32)
H = bytes(range(32))


def make(**kw) -> ChangeEvent:
    args = {"folder": "docs", "seq": 1, "lamport": 1, "kind": "modified", "path": "a/b.txt",
            "size": 5, "hash": H}
    args.update(kw)
    return ChangeEvent.create(ME, **args)


def test_roundtrip_and_verify() -> None:
    ev = make()
    back = ChangeEvent.decode(ev.encode())
    assert back == ev and back.id == ev.id and len(ev.id) == 32
    assert back.verify() is back


def test_any_changed_field_breaks_signature_and_id() -> None:
    ev = make()
    for idx, value in [(1, "other"), (2, 2), (3, 9), (4, ev.wall_ms + 1), (5, "created"),
                       (6, "c.txt"), (8, 6), (9, b"\x00" * 32)]:
        wire = ev.to_wire()
        wire[idx] = value
        forged = ChangeEvent.from_wire(wire)
        assert forged.id != ev.id
        with pytest.raises(ProtocolError, match="signature"):
            forged.verify()


def test_other_origin_cannot_claim_event() -> None:
    other = Identity.generate()
    wire = make().to_wire()
    wire[0] = other.peer_id.key
    with pytest.raises(ProtocolError):
        ChangeEvent.from_wire(wire).verify()


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b",
                                  "a\\b", "C:/x", "a\x00b", "x" * (MAX_PATH_BYTES + 1),
                                  "/".join(["d"] * 65)])
def test_bad_paths_rejected(path: str) -> None:
    with pytest.raises(ProtocolError):
        validate_rel_path(path)


@pytest.mark.parametrize("label", ["", ".", "..", "a/b", ".hidden", "x" * 65, "a\nb"])
def test_bad_folder_labels_rejected(label: str) -> None:
    with pytest.raises(ProtocolError):
        validate_folder(label)


def test_cross_field_rules() -> None:
    with pytest.raises(ProtocolError):
        make(kind="deleted")  # a deletion carries no hash
    assert make(kind="deleted", hash=b"", size=0).hash == b""
    with pytest.raises(ProtocolError):
        make(kind="moved")  # needs old_path
    assert make(kind="moved", old_path="old.txt").old_path == "old.txt"
    with pytest.raises(ProtocolError):
        make(old_path="x")  # only for moves
    with pytest.raises(ProtocolError):
        make(kind="exploded")
    with pytest.raises(ProtocolError):
        make(seq=0)
    with pytest.raises(ProtocolError):
        make(hash=b"short")


def test_oversize_encoding_refused() -> None:
    wire = make().to_wire()
    wire[6] = "a" * 5000
    with pytest.raises(ProtocolError):
        ChangeEvent.decode(packb(wire))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_crashes_on_junk(data: bytes) -> None:
    try:
        ChangeEvent.decode(data)
    except ProtocolError:
        pass
    try:
        Heartbeat.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(-5, 2**64), st.text(max_size=20), st.binary(max_size=70),
                          st.none(), st.booleans()), min_size=11, max_size=11))
def test_decoder_rejects_wrong_types(fields: list) -> None:
    try:
        ChangeEvent.from_wire(fields)
    except ProtocolError:
        pass


def test_heartbeat_roundtrip_and_forgery() -> None:
    hb = Heartbeat.create(ME)
    back = Heartbeat.decode(hb.encode())
    assert back == hb and back.verify() is back
    forged = Heartbeat(hb.origin, hb.wall_ms, "evil", hb.signature)
    with pytest.raises(ProtocolError):
        Heartbeat.decode(forged.encode()).verify()


def test_goodbye_roundtrip_and_a_heartbeat_is_not_a_goodbye() -> None:
    ident = Identity.generate()
    bye = Heartbeat.create(ident, leaving=True)
    back = Heartbeat.decode(bye.encode())
    assert back.leaving and back.verify() == bye
    # the same fields and signature as an ordinary heartbeat do not verify as a goodbye:
    # the two sign under different domains
    hb = Heartbeat.create(ident)
    passed_off = Heartbeat(hb.origin, hb.wall_ms, hb.name, hb.signature, leaving=True)
    with pytest.raises(ProtocolError):
        Heartbeat.decode(passed_off.encode()).verify()
    with pytest.raises(ProtocolError):
        Heartbeat.decode(packb([hb.origin.key, hb.wall_ms, hb.name, hb.signature, 1]))
