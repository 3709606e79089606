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


def test_untrusted_events_do_not_move_our_clock_and_are_capped(monkeypatch) -> None:
    log = EventLog(":memory:")
    stranger = Identity.generate()
    huge = ChangeEvent.create(stranger, folder="f", seq=1, lamport=2**63 - 1, kind="created",
                              path="p", size=1, hash=H)
    assert log.add(huge, relay_only=True) is AddOutcome.NEW
    assert log.append_local(A, kind="created", folder="f", path="q", size=1,
                            hash=H).lamport == 1
    monkeypatch.setattr("node.gossip.log.RELAY_ONLY_MAX_PER_ORIGIN", 3)
    outcomes = [log.add(ev(stranger, s), relay_only=True) for s in (2, 3, 4)]
    assert outcomes == [AddOutcome.NEW, AddOutcome.NEW, AddOutcome.QUOTA]
    assert log.add(ev(B, 1)) is AddOutcome.NEW  # trusted origins are not capped
    # even a trusted origin at the top of the range cannot make our own events fail
    log.add(ChangeEvent.create(B, folder="f", seq=2, lamport=2**63 - 1, kind="created",
                               path="p", size=1, hash=H))
    assert log.append_local(A, kind="created", folder="f", path="r", size=1,
                            hash=H).lamport == 2**63 - 1


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
