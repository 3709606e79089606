from __future__ import annotations

import pytest

from node.contact import ContactRecord
from node.errors import IdentityError, ProtocolError, UnknownPeer
from node.identity import PEER_ID_GROUPED_LEN, Identity, PeerId, normalize_id_text
from node.trust import TrustStore, resolve_peer


def make(ident: Identity, seq: int = 1, now: float = 1_000_000.0) -> ContactRecord:
    return ContactRecord.create(ident, ["127.0.0.1"], {"tcp": 1000, "dht": 1001}, seq, now=now)


def test_record_round_trips_and_verifies() -> None:
    ident = Identity.generate("a")
    rec = make(ident)
    assert ContactRecord.decode(rec.encode()).verify(now=1_000_001) == rec
    assert ContactRecord.from_json(rec.to_json()).verify(now=1_000_001) == rec
    assert rec.endpoint("tcp") == ("127.0.0.1", 1000) and rec.endpoint("quic") is None


def test_tampered_or_reattributed_record_fails() -> None:
    a, b = Identity.generate("a"), Identity.generate("b")
    rec = make(a)
    forged = ContactRecord(b.peer_id, rec.name, rec.hosts, rec.ports, rec.seq, rec.timestamp,
                           rec.expires, rec.signature)
    with pytest.raises(ProtocolError, match="bad signature"):
        forged.verify(now=1_000_001)
    moved = ContactRecord(a.peer_id, rec.name, ("127.9.9.9",), rec.ports, rec.seq,
                          rec.timestamp, rec.expires, rec.signature)
    with pytest.raises(ProtocolError):
        moved.verify(now=1_000_001)
    with pytest.raises(ProtocolError, match="expired"):
        rec.verify(now=rec.expires + 1)


@pytest.mark.parametrize("obj", [None, [], [1] * 8, {"peer_id": "x"}])
def test_garbage_records_rejected(obj) -> None:
    with pytest.raises(ProtocolError):
        if isinstance(obj, dict) or obj is None:
            ContactRecord.from_json(obj)
        else:
            ContactRecord.from_wire(obj)


def test_trust_store_and_resolution(tmp_path) -> None:
    store = TrustStore.in_home(tmp_path)
    a, b = Identity.generate(), Identity.generate()
    store.trust(a.peer_id, "alice")
    assert store.is_trusted(a.peer_id) and not store.is_trusted(b.peer_id)
    with pytest.raises(IdentityError, match="already names"):
        store.trust(b.peer_id, "alice")
    known = [(t.peer_id, [t.alias]) for t in store.all()] + [(b.peer_id, ["bob"])]
    assert resolve_peer("alice", known) == a.peer_id
    assert resolve_peer(b.peer_id.compact[:6].lower(), known) == b.peer_id
    assert resolve_peer(str(b.peer_id), []) == b.peer_id
    with pytest.raises(UnknownPeer, match="no trusted peer or alias matches 'AB'"):
        resolve_peer("AB", known)
    with pytest.raises(UnknownPeer, match="no trusted peer or alias matches"):
        resolve_peer("QQQQQQ" if not a.peer_id.compact.startswith("QQ") else "RRRRRR", [])
    with pytest.raises(UnknownPeer, match="checksum"):
        bad = b.peer_id.compact[:-1] + ("A" if b.peer_id.compact[-1] != "A" else "B")
        resolve_peer(bad, known)
    assert store.untrust(a.peer_id) and not store.is_trusted(a.peer_id)
    store.close()


def test_ambiguous_prefix() -> None:
    import os

    seen: dict[str, PeerId] = {}
    while True:  # birthday search: two ids sharing a 4-character prefix
        pid = PeerId(os.urandom(32))
        other = seen.setdefault(pid.compact[:4], pid)
        if other != pid:
            break
    with pytest.raises(UnknownPeer, match="ambiguous"):
        resolve_peer(pid.compact[:4], [(pid, []), (other, [])])
    assert resolve_peer(pid.compact[:20], [(pid, []), (other, [])]) == pid


def _typo(pid: PeerId) -> str:
    """The grouped id with one character (not a dash) changed."""
    text = str(pid)
    return text[:3] + ("A" if text[3] != "A" else "B") + text[4:]


def test_full_id_with_a_typo_says_checksum_not_length() -> None:
    pid = Identity.generate().peer_id
    for typed in (_typo(pid), normalize_id_text(_typo(pid)).lower()):
        with pytest.raises(UnknownPeer) as info:
            resolve_peer(typed, [])
        msg = str(info.value)
        assert "looks like a full peer id but its checksum does not match" in msg, msg
        assert "mistyped" in msg and "prefix" not in msg


def test_wrong_length_counts_characters_as_typed() -> None:
    pid = Identity.generate().peer_id
    grouped = str(pid)
    assert len(grouped) == PEER_ID_GROUPED_LEN == 63
    with pytest.raises(IdentityError, match=r"63 in the grouped form.*has 62 with its dashes "
                                            r"\(55 without\)"):
        PeerId.parse(grouped[:-1])
    with pytest.raises(UnknownPeer, match=r"has 62 with its dashes"):
        resolve_peer(grouped[:-1], [])
    with pytest.raises(IdentityError, match=r"this one has 57$"):
        PeerId.parse(pid.compact + "A")


def test_short_unknown_name_suggests_close_aliases() -> None:
    a, b = Identity.generate(), Identity.generate()
    known = [(a.peer_id, ["bob"]), (b.peer_id, ["carol"])]
    with pytest.raises(UnknownPeer) as info:
        resolve_peer("bbo", known)
    msg = str(info.value)
    assert msg == "no trusted peer or alias matches 'bbo'; did you mean 'bob'?"
    with pytest.raises(UnknownPeer, match="no trusted peer or alias matches 'zzzzzz'; give an "
                                          "alias, a peer id prefix"):
        resolve_peer("zzzzzz" if not a.peer_id.compact.startswith("ZZ") else "yyyyyy", known)
