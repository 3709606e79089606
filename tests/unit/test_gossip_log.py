"""The SQLite event log: outcomes, watermarks, queries, own counters, notifications."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.gossip.events import ChangeEvent
from node.gossip.log import AddOutcome, EventLog, ms_from_text
from node.identity import Identity

A = Identity.generate(name="a", seed=b"\x0a" * 32)
B = Identity.generate(name="b", seed=b"\x0b" * 32)
H = b"\x07" * 32


def ev(ident: Identity, seq: int, path: str = "p", wall_ms: int = 1000) -> ChangeEvent:
    return ChangeEvent.create(ident, folder="f", seq=seq, lamport=seq, kind="created", path=path,
                              size=1, hash=H, wall_ms=wall_ms)


def test_add_outcomes() -> None:
    log = EventLog(":memory:")
    e1 = ev(A, 1)
    assert log.add(e1) is AddOutcome.NEW
    assert log.add(e1) is AddOutcome.DUPLICATE
    assert log.add(ev(A, 1, path="other")) is AddOutcome.CONFLICT
    assert log.count() == 1 and len(log.rejected()) == 1


def test_contiguous_watermark_and_missing_for() -> None:
    log = EventLog(":memory:")
    for s in (1, 2, 4, 5):
        log.add(ev(A, s))
    assert log.highest_seqs() == {A.peer_id.key: 2}
    assert log.top_seqs() == {A.peer_id.key: 5}
    log.add(ev(A, 3))
    assert log.highest_seqs() == {A.peer_id.key: 5}
    log.add(ev(B, 1))
    missing = log.missing_for({A.peer_id.key: 3})
    assert sorted((e.origin == A.peer_id, e.seq) for e in missing) == [
        (False, 1), (True, 4), (True, 5)]
    assert log.missing_for({A.peer_id.key: 5, B.peer_id.key: 1}) == []
    assert len(log.missing_for({}, limit=2)) == 2


def test_query_filters() -> None:
    log = EventLog(":memory:")
    log.add(ev(A, 1, "docs/a.txt", 1000))
    log.add(ev(A, 2, "img/b.png", 2000))
    log.add(ev(B, 1, "docs/c.txt", 3000))
    log.add(ev(Identity.generate(), 1, "docs/x"), relay_only=True)
    assert [e.path for e in log.query()] == ["docs/a.txt", "img/b.png", "docs/c.txt"]
    assert [e.path for e in log.query(peer=B.peer_id)] == ["docs/c.txt"]
    assert [e.path for e in log.query(since_ms=2000)] == ["img/b.png", "docs/c.txt"]
    assert [e.path for e in log.query(path_glob="docs/*")] == ["docs/a.txt", "docs/c.txt"]
    assert [e.path for e in log.query(limit=1)] == ["docs/c.txt"]


def test_own_counters_persist(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    log = EventLog(path)
    e1 = log.append_local(A, kind="created", folder="f", path="x", size=1, hash=H)
    e2 = log.append_local(A, kind="deleted", folder="f", path="x", size=0, hash=b"")
    log.add(ev(B, 1))
    assert (e1.seq, e2.seq) == (1, 2) and e2.lamport > e1.lamport
    log.close()
    log = EventLog(path)
    e3 = log.append_local(A, kind="created", folder="f", path="y", size=1, hash=H)
    assert e3.seq == 3 and e3.lamport == 3
    assert log.query(peer=A.peer_id)[-1] == e3
    log.close()


def test_lamport_follows_received_events() -> None:
    log = EventLog(":memory:")
    far = ChangeEvent.create(B, folder="f", seq=1, lamport=50, kind="created", path="p",
                             size=1, hash=H)
    log.add(far)
    mine = log.append_local(A, kind="created", folder="f", path="q", size=1, hash=H)
    assert mine.lamport == 51


def test_notification_ids_go_up_by_one(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "n.db")
    ids = [log.notify("file_updated", {"path": f"p{i}"}) for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    got = log.notifications(since_id=2)
    assert [n.id for n in got] == [3, 4, 5] and got[0].data == {"path": "p2"}
    with pytest.raises(ValueError):
        log.notify("bogus", {})
    log.close()
    log = EventLog(tmp_path / "n.db")
    assert log.notify("peer_joined", {}) == 6
    log.close()


async def test_wait_for_notification_wakes_up() -> None:
    log = EventLog(":memory:")
    assert await log.wait_for_notification(0, timeout=0.05) == []
    seen = []
    unsubscribe = log.add_listener(seen.append)
    waiter = asyncio.create_task(log.wait_for_notification(0, timeout=5))
    await asyncio.sleep(0.01)
    log.notify("file_received", {"path": "z"})
    got = await waiter
    assert [n.kind for n in got] == ["file_received"] and len(seen) == 1
    unsubscribe()
    log.notify("file_received", {"path": "z2"})
    assert len(seen) == 1
    log.close()


def test_since_parsing() -> None:
    assert ms_from_text("12345") == 12345
    assert ms_from_text("10m") < ms_from_text("1m")
    with pytest.raises(ConfigError, match="--since"):
        ms_from_text("yesterday")


def test_untrusted_events_do_not_move_our_clock() -> None:
    log = EventLog(":memory:")
    stranger = Identity.generate()
    huge = ChangeEvent.create(stranger, folder="f", seq=1, lamport=2**63 - 1, kind="created",
                              path="p", size=1, hash=H)
    assert log.add(huge, relay_only=True) is AddOutcome.NEW
    assert log.append_local(A, kind="created", folder="f", path="q", size=1,
                            hash=H).lamport == 1
    # even a trusted origin at the top of the range cannot make our own events fail
    log.add(ChangeEvent.create(B, folder="f", seq=2, lamport=2**63 - 1, kind="created",
                               path="p", size=1, hash=H))
    assert log.append_local(A, kind="created", folder="f", path="r", size=1,
                            hash=H).lamport == 2**63 - 1


def _small_caps(monkeypatch, *, per_origin: int = 8, total: int = 64, origins: int = 16,
                remembered: int = 1024, per_origin_bytes: int = 256 * 1024,
                total_bytes: int = 2 * 1024 * 1024) -> None:
    for name, value in (("EVENTS_PER_ORIGIN", per_origin), ("EVENTS_TOTAL", total),
                        ("ORIGINS", origins), ("BYTES_PER_ORIGIN", per_origin_bytes),
                        ("BYTES_TOTAL", total_bytes)):
        monkeypatch.setattr(f"node.gossip.log.RELAY_ONLY_MAX_{name}", value)
    monkeypatch.setattr("node.gossip.log.RELAY_ONLY_ORIGINS_REMEMBERED_MAX", remembered)


def _relay_held(log: EventLog) -> tuple[int, int, dict[bytes, int]]:
    db = log._db
    n, size = db.execute("SELECT COUNT(*), COALESCE(SUM(length(raw)), 0) FROM events"
                         " WHERE relay_only=1").fetchone()
    per = dict(db.execute("SELECT origin, COUNT(*) FROM events WHERE relay_only=1"
                          " GROUP BY origin"))
    return n, size, per


STRANGERS = [Identity.generate(seed=bytes([200, i]) * 16) for i in range(200)]


def test_flood_from_200_untrusted_origins_stays_under_the_caps(monkeypatch) -> None:
    _small_caps(monkeypatch)
    log = EventLog(":memory:")
    for s in range(1, 41):
        assert log.add(ev(B, s)) is AddOutcome.NEW  # a trusted origin, before...
    for s in range(1, 13):
        for stranger in STRANGERS:
            log.add(ev(stranger, s), relay_only=True)
    for s in range(41, 81):
        assert log.add(ev(B, s)) is AddOutcome.NEW  # ...and after the flood
    n, size, per = _relay_held(log)
    assert n <= 64 and max(per.values()) <= 8 and len(per) <= 16
    # the newest origins are the ones kept, each with its newest events
    assert set(per) <= {s.peer_id.key for s in STRANGERS[-16:]}
    kept = log._db.execute("SELECT MIN(seq) FROM events WHERE relay_only=1").fetchone()[0]
    assert kept >= 12 - 8 + 1
    # trusted origins are never evicted
    assert len(log.query(peer=B.peer_id, limit=1000)) == 80
    assert log.highest_seqs()[B.peer_id.key] == 80
    # the O(1) counters agree with a full count
    st = log.stats()
    assert st.events == log.count() == 80 + n
    assert (st.relay_only_events, st.relay_only_bytes) == (n, size)
    assert st.relay_only_origins == len(per) and st.relay_only_origins_remembered == 200
    assert st.relay_only_pruned == 200 * 12 - n


def test_relay_byte_caps(monkeypatch) -> None:
    _small_caps(monkeypatch, per_origin=1000, total=1000, per_origin_bytes=3000,
                total_bytes=10_000)
    log = EventLog(":memory:")
    big = "/".join(["d" * 230] * 3) + "/f"  # ~ 900-byte events (components <= 255 bytes)
    for s in range(1, 11):
        for stranger in STRANGERS[:10]:
            log.add(ev(stranger, s, path=big), relay_only=True)
    _n, size, per = _relay_held(log)
    assert size <= 10_000 and log.stats().relay_only_bytes == size
    sizes = dict(log._db.execute("SELECT origin, SUM(length(raw)) FROM events"
                                 " WHERE relay_only=1 GROUP BY origin"))
    assert max(sizes.values()) <= 3000 and len(per) >= 3


def test_pruned_untrusted_events_are_refused_and_not_pulled_again(monkeypatch) -> None:
    _small_caps(monkeypatch, per_origin=4, total=8, origins=2)
    log = EventLog(":memory:")
    s1, s2, s3 = STRANGERS[:3]
    for s in range(1, 7):
        log.add(ev(s1, s), relay_only=True)
    # per-origin cap: 1..2 pruned, 3..6 kept; a re-sent old copy is refused, not stored
    assert [e.seq for e in log.query(peer=s1.peer_id, include_relay_only=True)] == [3, 4, 5, 6]
    assert log.add(ev(s1, 1), relay_only=True) is AddOutcome.PRUNED
    # the digest carries the high-water mark, so peers send nothing we pruned
    assert dict(log.digest_seqs(100))[s1.peer_id.key] == 6
    assert log.missing_for({s1.peer_id.key: 6}) == []
    # a gap below the high-water mark does not trigger a pull either
    log.add(ev(s1, 9), relay_only=True)
    assert log.watermark(s1.peer_id.key) == (9, 9)
    # over the origins cap, the least recently active origin is evicted wholesale
    log.add(ev(s2, 1), relay_only=True)
    log.add(ev(s3, 1), relay_only=True)
    assert log.query(peer=s1.peer_id, include_relay_only=True) == []
    assert log.add(ev(s1, 5), relay_only=True) is AddOutcome.PRUNED
    assert dict(log.digest_seqs(100))[s1.peer_id.key] == 9  # its tombstone
    # and a newer event brings it back
    assert log.add(ev(s1, 10), relay_only=True) is AddOutcome.NEW
    assert log.stats().relay_only_origins == 2


def test_tombstones_are_bounded_and_trusted_origins_lead_the_digest(monkeypatch) -> None:
    _small_caps(monkeypatch, per_origin=2, total=4, origins=2, remembered=10)
    log = EventLog(":memory:")
    log.add(ev(B, 1))
    for stranger in STRANGERS[:50]:
        log.add(ev(stranger, 1), relay_only=True)
    assert log.stats().relay_only_origins_remembered == 10
    assert log._db.execute("SELECT COUNT(*) FROM relay_origins").fetchone()[0] == 10
    assert log._db.execute("SELECT COUNT(*) FROM watermarks").fetchone()[0] == 11
    digest = log.digest_seqs(3)
    assert digest[0] == (B.peer_id.key, 1)  # whatever the keys sort like
    assert digest[1][0] == STRANGERS[49].peer_id.key  # then the most recently active


def test_missing_for_shares_a_batch_fairly_trusted_first(monkeypatch) -> None:
    log = EventLog(":memory:")
    for stranger in STRANGERS[:20]:
        for s in range(1, 31):
            log.add(ev(stranger, s), relay_only=True)
    for s in range(1, 31):
        log.add(ev(B, s))
    batch = log.missing_for({}, limit=40)
    origins = [e.origin for e in batch]
    assert len(batch) == 40 and origins[:30] == [B.peer_id] * 30
    assert len(set(origins[30:])) == 10  # ten strangers, one each, not one with ten
    # per origin, oldest first
    assert [e.seq for e in batch[:30]] == list(range(1, 31))


def test_stats_counters_survive_reopen(tmp_path: Path, monkeypatch) -> None:
    _small_caps(monkeypatch, per_origin=3, total=6, origins=4)
    log = EventLog(tmp_path / "s.db")
    log.append_local(A, kind="created", folder="f", path="x", size=1, hash=H)
    for stranger in STRANGERS[:5]:
        for s in range(1, 5):
            log.add(ev(stranger, s), relay_only=True)
    before = log.stats()
    log.close()
    log = EventLog(tmp_path / "s.db")
    after = log.stats()
    assert (after.events, after.relay_only_events, after.relay_only_bytes,
            after.relay_only_origins, after.relay_only_origins_remembered) == (
        before.events, before.relay_only_events, before.relay_only_bytes,
        before.relay_only_origins, before.relay_only_origins_remembered)
    assert after.events == log.count() == 1 + 6
    log.close()


def test_pruning_keeps_ids_counting_up(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("node.gossip.log.PRUNE_EVERY", 10)
    monkeypatch.setattr("node.gossip.log.NOTIFICATIONS_KEEP", 5)
    log = EventLog(tmp_path / "p.db")
    for i in range(20):
        log.notify("file_updated", {"i": i})
    kept = log.notifications(0)
    assert kept[-1].id == 20 and len(kept) < 20 and kept[0].id > 1
    log.close()
    log = EventLog(tmp_path / "p.db")
    assert log.notify("file_updated", {}) == 21
    log.close()


def test_relay_events_of_an_older_log_are_counted_and_capped(tmp_path: Path,
                                                              monkeypatch) -> None:
    path = tmp_path / "old.db"
    log = EventLog(path)
    for stranger in STRANGERS[:6]:
        for s in range(1, 11):
            log.add(ev(stranger, s), relay_only=True)
    log.add(ev(B, 1))
    # what a log written before the relay caps looks like: no relay_origins rows
    log._db.execute("DELETE FROM relay_origins")
    log._db.execute("DELETE FROM local WHERE key='relay_origins_v1'")
    log.close()
    log = EventLog(path)
    st = log.stats()
    assert (st.events, st.relay_only_events, st.relay_only_origins) == (61, 60, 6)
    _small_caps(monkeypatch, per_origin=4, total=12, origins=3)
    log.add(ev(STRANGERS[0], 11), relay_only=True)
    n, size, per = _relay_held(log)
    assert n <= 12 and len(per) <= 3 and log.stats().relay_only_bytes == size
    assert log.count() == log.stats().events
    log.close()


def test_real_caps_bound_200_untrusted_origins() -> None:
    """No monkeypatching: 200 origins x 25 events (5,000) against the shipped caps."""
    from node.gossip import log as log_mod

    log = EventLog(":memory:")
    for s in range(1, 26):
        for stranger in STRANGERS:
            log.add(ev(stranger, s), relay_only=True)
        log.add(ev(B, s))
    n, size, per = _relay_held(log)
    assert 0 < n <= log_mod.RELAY_ONLY_MAX_EVENTS_TOTAL < 200 * 25
    assert size <= log_mod.RELAY_ONLY_MAX_BYTES_TOTAL
    assert len(per) <= log_mod.RELAY_ONLY_MAX_ORIGINS
    assert max(per.values()) <= log_mod.RELAY_ONLY_MAX_EVENTS_PER_ORIGIN
    assert len(log.query(peer=B.peer_id, limit=100)) == 25
    assert log.stats().events == log.count()
