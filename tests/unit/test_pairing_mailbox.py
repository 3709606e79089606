"""The pairing mailbox store, pure (`now` passed in): one claim per code, bounded
messages, and forgetting after use, after one failed PAKE and after expiry."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bootstrap.mailbox import (
    MAX_MESSAGE_BYTES,
    TOMBSTONE_KEEP_S,
    MailboxError,
    MailboxStore,
)
from node.identity import Identity
from node.trust import TrustStore


def store() -> MailboxStore:
    n = iter(range(1000))
    return MailboxStore(max_nameplates=4, token=lambda: f"{next(n):032x}")


def exchange(s: MailboxStore, now: float = 0.0) -> tuple[int, str, str]:
    number, ta, _ = s.allocate(60, now)
    tb, _ = s.claim(number, now)
    s.post(number, ta, "pake", b"a" * 33, now)
    s.post(number, tb, "pake", b"b" * 33, now)
    return number, ta, tb


def gone_reason(s: MailboxStore, number: int, now: float) -> str:
    with pytest.raises(MailboxError) as info:
        s.claim(number, now)
    return info.value.reason


def test_lowest_free_nameplate_and_one_claim() -> None:
    s = store()
    assert s.allocate(60, 0)[0] == 1 and s.allocate(60, 0)[0] == 2
    s.claim(1, 0)
    with pytest.raises(MailboxError) as info:
        s.claim(1, 0)
    assert (info.value.status, info.value.reason) == (409, "used")


def test_messages_go_to_the_other_side_only_once_per_phase() -> None:
    s = store()
    number, ta, tb = exchange(s)
    assert s.fetch(number, ta, 0, 0) == [("pake", b"b" * 33)]
    assert s.fetch(number, tb, 0, 0) == [("pake", b"a" * 33)]
    with pytest.raises(MailboxError, match="already posted"):
        s.post(number, ta, "pake", b"x", 0)
    with pytest.raises(MailboxError, match="phase"):
        s.post(number, ta, "hello", b"x", 0)
    with pytest.raises(MailboxError) as info:
        s.post(number, ta, "box", b"x" * (MAX_MESSAGE_BYTES + 1), 0)
    assert info.value.status == 413
    with pytest.raises(MailboxError) as info:
        s.fetch(number, "f" * 32, 0, 0)
    assert info.value.status == 403


def test_box_before_pake_is_refused() -> None:
    s = store()
    number, ta, _ = s.allocate(60, 0)
    with pytest.raises(MailboxError, match="before the box"):
        s.post(number, ta, "box", b"x", 0)


def test_forgotten_after_the_first_complete_exchange() -> None:
    s = store()
    number, ta, tb = exchange(s)
    s.post(number, ta, "box", b"A", 0)
    s.post(number, tb, "box", b"B", 0)
    assert s.fetch(number, ta, 1, 0) == [("box", b"B")]
    assert len(s) == 1
    assert s.fetch(number, tb, 1, 0) == [("box", b"A")]
    assert len(s) == 0
    assert gone_reason(s, number, 1) == "used"


def test_forgotten_after_one_failed_pake() -> None:
    s = store()
    number, ta, _ = exchange(s)
    s.release(number, ta, True, 0)
    assert len(s) == 0
    assert gone_reason(s, number, 1) == "failed"


def test_failure_reported_after_the_exchange_marks_it_failed() -> None:
    s = store()
    number, ta, tb = exchange(s)
    s.post(number, ta, "box", b"A", 0)
    s.post(number, tb, "box", b"B", 0)
    s.fetch(number, ta, 1, 0)
    s.fetch(number, tb, 1, 0)
    s.release(number, ta, True, 0)
    assert gone_reason(s, number, 1) == "failed"


def test_forgotten_after_expiry_and_number_reused_later() -> None:
    s = store()
    number, _, _ = s.allocate(60, 0)
    assert gone_reason(s, number, 61) == "expired"
    assert gone_reason(s, number, 61 + TOMBSTONE_KEEP_S + 1) == "unknown"
    assert s.allocate(60, 61 + TOMBSTONE_KEEP_S + 1)[0] == number


def test_the_number_of_nameplates_is_bounded() -> None:
    s = store()
    for _ in range(4):
        s.allocate(60, 0)
    with pytest.raises(MailboxError) as info:
        s.allocate(60, 0)
    assert info.value.status == 503


def test_trust_store_migrates_old_files_and_records_how(tmp_path: Path) -> None:
    path = tmp_path / "trust.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE trusted (peer_key BLOB PRIMARY KEY, alias TEXT NOT NULL "
               "DEFAULT '', added_at REAL NOT NULL)")
    old, new = Identity.generate().peer_id, Identity.generate().peer_id
    db.execute("INSERT INTO trusted VALUES (?, 'old', 1.0)", (old.key,))
    db.commit()
    db.close()
    trust = TrustStore(path)
    try:
        assert trust.get(old).added_via == "id"
        assert trust.trust(new, "new", added_via="invite").added_via == "invite"
        assert trust.trust(new, "renamed").added_via == "invite"  # how it was first added
        assert [t.to_json()["added_via"] for t in trust.all()] == ["id", "invite"]
        with pytest.raises(ValueError):
            trust.trust(new, added_via="magic")
    finally:
        trust.close()
    TrustStore(path).close()  # opening a migrated store again is a no-op
