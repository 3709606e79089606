from __future__ import annotations

import pytest

from node.contact import ContactRecord
from node.errors import IdentityError, ProtocolError, UnknownPeer
from node.identity import Identity, PeerId
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
    with pytest.raises(UnknownPeer, match="too short"):
        resolve_peer("AB", known)
    with pytest.raises(UnknownPeer, match="no known peer"):
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
