"""PeerCache over a real SQLite file: verification, highest seq, re-verification on load."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest

from dht.peercache import PeerCache
from node.contact import ContactRecord
from node.errors import ProtocolError
from node.identity import Identity


def rec(ident: Identity, seq: int, dht_port: int, *, now: float | None = None) -> ContactRecord:
    return ContactRecord.create(ident, ["127.0.0.1"], {"dht": dht_port, "tcp": 7000}, seq,
                                now=now)


def test_round_trip_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "peers.db"
    cache = PeerCache(path)
    a, b = Identity.generate("a"), Identity.generate("b")
    assert cache.add(rec(a, 1, 4001), "bootstrap")
    assert cache.add(rec(b, 1, 4002), "dht")
    cache.close()
    cache = PeerCache(path)
    got = cache.get(a.peer_id)
    assert got is not None and got.peer_id == a.peer_id and got.ports["dht"] == 4001
    sources = {r.peer_id: s for r, s, _ in cache.records()}
    assert sources == {a.peer_id: "bootstrap", b.peer_id: "dht"}
    assert sorted(cache.dht_addresses()) == [("127.0.0.1", 4001), ("127.0.0.1", 4002)]
    cache.close()


def test_keeps_highest_seq(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db")
    a = Identity.generate("a")
    assert cache.add(rec(a, 5, 4005), "dht")
    assert not cache.add(rec(a, 4, 4004), "gossip")
    assert cache.get(a.peer_id).seq == 5
    assert cache.add(rec(a, 6, 4006), "cache")
    got = cache.get(a.peer_id)
    assert got.seq == 6 and got.ports["dht"] == 4006
    assert len(cache) == 1
    cache.close()


def test_refuses_invalid_records_and_sources(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db")
    a = Identity.generate("a")
    forged = dataclasses.replace(rec(a, 1, 4001), hosts=("127.6.6.6",))
    with pytest.raises(ProtocolError):
        cache.add(forged, "dht")
    with pytest.raises(ProtocolError):
        cache.add(rec(a, 1, 4001, now=time.time() - 7200), "dht")  # expired
    with pytest.raises(ValueError):
        cache.add(rec(a, 1, 4001), "rumour")
    assert len(cache) == 0
    cache.close()


def test_tampered_rows_are_dropped_on_load(tmp_path: Path) -> None:
    path = tmp_path / "peers.db"
    cache = PeerCache(path)
    a, b = Identity.generate("a"), Identity.generate("b")
    cache.add(rec(a, 1, 4001), "dht")
    cache.add(rec(b, 1, 4002), "dht")
    cache.close()
    forged = dataclasses.replace(rec(a, 1, 4001), hosts=("127.6.6.6",))
    db = sqlite3.connect(path)
    db.execute("UPDATE peers SET record = ? WHERE peer_key = ?", (forged.encode(), a.peer_id.key))
    db.execute("UPDATE peers SET record = ? WHERE peer_key = ?", (b"\xc1junk", b.peer_id.key))
    db.commit()
    db.close()
    cache = PeerCache(path)
    assert cache.get(a.peer_id) is None
    assert cache.records() == []
    assert cache.dht_addresses() == []
    assert len(cache) == 0
    cache.close()


def test_dht_addresses_most_recent_first_and_limited(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db")
    idents = [Identity.generate(f"n{i}") for i in range(5)]
    now = time.time()
    for i, ident in enumerate(idents):
        cache.add(rec(ident, 1, 5000 + i), "dht", now=now + i)
    assert cache.dht_addresses(limit=3) == [("127.0.0.1", 5004), ("127.0.0.1", 5003),
                                            ("127.0.0.1", 5002)]
    cache.add(rec(idents[0], 1, 5000), "dht", now=now + 10)  # seen again
    assert cache.dht_addresses(limit=1) == [("127.0.0.1", 5000)]
    cache.close()


def test_expired_records_still_give_rejoin_addresses(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db")
    a = Identity.generate("a")
    t = time.time() - 3000
    cache.add(ContactRecord.create(a, ["127.0.0.1"], {"dht": 4100}, 1, now=t, ttl_s=3600),
              "dht", now=t)
    db_record = cache.records()[0][0]
    assert cache.get(a.peer_id) == db_record  # still current
    assert cache.dht_addresses() == [("127.0.0.1", 4100)]
    cache.close()


def test_size_is_bounded(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db", max_peers=3)
    now = time.time()
    idents = [Identity.generate() for _ in range(5)]
    for i, ident in enumerate(idents):
        cache.add(rec(ident, 1, 6000 + i), "dht", now=now + i)
    assert len(cache) == 3
    assert {r.peer_id for r, _, _ in cache.records()} == {i.peer_id for i in idents[2:]}
    cache.close()


def test_uses_wal(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path / "peers.db")
    (mode,) = cache._db.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"
    cache.close()
