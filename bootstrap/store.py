"""SQLite registry of the bootstrap server: who registered, with which record, until when.

Two tables:

* ``registrations``: one row per device id (canonical peer id text, or a legacy
  bare id) with its contact record as compact JSON text (NULL for legacy ids),
  ``last_seen`` and ``expires_at`` (unix seconds). Keyed and ordered by
  ``device_id`` so ``page()`` is keyset paging over the primary key: a page
  costs O(limit) whatever the table size, never an OFFSET scan.
* ``replay_guard``: per peer id, the highest (seq, timestamp) ever accepted and
  the timestamp of the last signed unregister. It outlives the registration
  (kept ``GUARD_KEEP_S``, the longest a contact record can live), so an old
  record or an old unregister request replayed after expiry or deletion is
  still recognised as stale.

Every method takes ``now`` from the caller (no clock inside) and runs one
short transaction; the server calls them on its event loop thread. The store
knows nothing of HTTP or signatures: the caller has verified records first.
Imports nothing of the project except errors and contact (for a constant).
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.contact import MAX_RECORD_TTL_S
from node.errors import LocalIOError, ProtocolError

SCHEMA_VERSION = 1
GUARD_KEEP_S = float(MAX_RECORD_TTL_S)
PURGE_BATCH_ROWS = 1000
SQLITE_BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (
    device_id  TEXT PRIMARY KEY,
    record     TEXT,
    last_seen  REAL NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS registrations_expires_at ON registrations(expires_at);
CREATE INDEX IF NOT EXISTS registrations_last_seen ON registrations(last_seen);
CREATE TABLE IF NOT EXISTS replay_guard (
    device_id  TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    timestamp  INTEGER NOT NULL,
    deleted_at INTEGER NOT NULL DEFAULT 0,
    keep_until REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS replay_guard_keep_until ON replay_guard(keep_until);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StaleRegistration(ProtocolError):
    """A record or unregister request older than what the registry already accepted."""


class RegisterOutcome(enum.Enum):
    NEW = "new"            # not registered (or expired) before
    REFRESHED = "refreshed"  # was online; expiry pushed back


class UnregisterOutcome(enum.Enum):
    REMOVED = "removed"
    UNKNOWN = "unknown"    # no online registration under that id


@dataclass(frozen=True)
class Registration:
    device_id: str
    record_json: str | None
    last_seen: float
    expires_at: float


class RegistryStore:
    """The registry file. Not thread-safe: use it from one thread (the event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None,
                                       timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a crash may lose the last registrations, never corrupt the file;
            # they are refreshed every minute anyway
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA temp_store=MEMORY")
            self._db.execute("PRAGMA cache_size=-32000")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                             (str(SCHEMA_VERSION),))
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise LocalIOError(f"cannot open bootstrap registry {path}: {exc}") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            self._db.close()
            raise LocalIOError(f"{path}: registry schema {row and row[0]!r} is not "
                               f"{SCHEMA_VERSION}; move the file away to start afresh")

    def close(self) -> None:
        self._db.close()

    # -- writes -------------------------------------------------------------
    def register(self, device_id: str, record_json: str | None, *, now: float,
                 expires_at: float, seq: int | None = None,
                 timestamp: int | None = None) -> RegisterOutcome:
        """Insert or refresh a registration; with seq/timestamp, enforce the replay guard.

        Raises StaleRegistration when (seq, timestamp) is lower than the highest
        accepted for this id, or the record predates the last signed unregister.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if seq is not None and timestamp is not None:
                guard = db.execute(
                    "SELECT seq, timestamp, deleted_at FROM replay_guard WHERE device_id=?",
                    (device_id,)).fetchone()
                if guard is not None:
                    g_seq, g_ts, g_deleted = guard
                    if (seq, timestamp) < (g_seq, g_ts):
                        raise StaleRegistration(
                            f"record seq {seq} is older than the registered seq {g_seq} "
                            "(replayed or stale record)")
                    if timestamp < g_deleted:
                        raise StaleRegistration(
                            "record predates this peer's last signed unregister")
                db.execute(
                    "INSERT INTO replay_guard(device_id, seq, timestamp, keep_until) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                    "seq=excluded.seq, timestamp=excluded.timestamp, "
                    "keep_until=excluded.keep_until",
                    (device_id, seq, timestamp, now + GUARD_KEEP_S))
            was_online = db.execute(
                "SELECT 1 FROM registrations WHERE device_id=? AND expires_at>?",
                (device_id, now)).fetchone() is not None
            db.execute(
                "INSERT INTO registrations(device_id, record, last_seen, expires_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                "record=excluded.record, last_seen=excluded.last_seen, "
                "expires_at=excluded.expires_at",
                (device_id, record_json, now, expires_at))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return RegisterOutcome.REFRESHED if was_online else RegisterOutcome.NEW

    def unregister(self, device_id: str, *, now: float,
                   signed_timestamp: int | None = None) -> UnregisterOutcome:
        """Remove an online registration.

        With ``signed_timestamp`` (a peer id's signed request) the request must be
        newer than the registered record and than the last unregister, else
        StaleRegistration: a captured request cannot be replayed later.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            online = db.execute(
                "SELECT 1 FROM registrations WHERE device_id=? AND expires_at>?",
                (device_id, now)).fetchone() is not None
            if not online:
                db.execute("COMMIT")
                return UnregisterOutcome.UNKNOWN
            if signed_timestamp is not None:
                guard = db.execute(
                    "SELECT timestamp, deleted_at FROM replay_guard WHERE device_id=?",
                    (device_id,)).fetchone()
                if guard is not None and (signed_timestamp < guard[0]
                                          or signed_timestamp <= guard[1]):
                    raise StaleRegistration(
                        "unregister request is older than the current registration")
                db.execute(
                    "INSERT INTO replay_guard(device_id, seq, timestamp, deleted_at, keep_until) "
                    "VALUES (?, 0, 0, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                    "deleted_at=excluded.deleted_at, keep_until=excluded.keep_until",
                    (device_id, signed_timestamp, now + GUARD_KEEP_S))
            db.execute("DELETE FROM registrations WHERE device_id=?", (device_id,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return UnregisterOutcome.REMOVED

    def purge_expired(self, now: float, *, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        """Delete up to ``batch_rows`` expired registrations and stale guards; returns rows."""
        cur = self._db.execute(
            "DELETE FROM registrations WHERE device_id IN (SELECT device_id FROM "
            "registrations WHERE expires_at<=? LIMIT ?)", (now, batch_rows))
        removed = cur.rowcount
        cur = self._db.execute(
            "DELETE FROM replay_guard WHERE device_id IN (SELECT device_id FROM "
            "replay_guard WHERE keep_until<=? LIMIT ?)", (now, batch_rows))
        return removed + cur.rowcount

    def bulk_load(self, rows: Iterable[tuple[str, str | None, float, float]]) -> None:
        """Insert (device_id, record_json, last_seen, expires_at) rows in one transaction.

        For benchmarks and imports only: no replay guard, no checks.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO registrations VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- reads --------------------------------------------------------------
    def get(self, device_id: str, *, now: float) -> Registration | None:
        row = self._db.execute(
            "SELECT device_id, record, last_seen, expires_at FROM registrations "
            "WHERE device_id=? AND expires_at>?", (device_id, now)).fetchone()
        return Registration(*row) if row else None

    def others(self, device_id: str, limit: int, *, now: float) -> list[tuple[str, str | None]]:
        """Up to ``limit`` other online registrations, most recently seen first."""
        # walks the last_seen index from the newest end and stops after `limit` rows
        return self._db.execute(
            "SELECT device_id, record FROM registrations INDEXED BY registrations_last_seen "
            "WHERE expires_at>? AND device_id<>? ORDER BY last_seen DESC LIMIT ?",
            (now, device_id, limit)).fetchall()

    def page(self, limit: int, after: str | None, *, now: float) -> list[Registration]:
        """Online registrations with device_id > ``after``, in device_id order."""
        if after is None:
            rows = self._db.execute(
                "SELECT device_id, record, last_seen, expires_at FROM registrations "
                "WHERE expires_at>? ORDER BY device_id LIMIT ?", (now, limit)).fetchall()
        else:
            rows = self._db.execute(
                "SELECT device_id, record, last_seen, expires_at FROM registrations "
                "WHERE device_id>? AND expires_at>? ORDER BY device_id LIMIT ?",
                (after, now, limit)).fetchall()
        return [Registration(*r) for r in rows]

    def count_online(self, *, now: float) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM registrations WHERE expires_at>?", (now,)).fetchone()
        return int(row[0])

    def count_rows(self) -> int:
        """All registration rows, expired ones included (tests and purge checks)."""
        return int(self._db.execute("SELECT count(*) FROM registrations").fetchone()[0])

    def explain_page(self) -> str:
        """The query plan of a keyset page (a test checks it uses the primary key)."""
        rows = self._db.execute(
            "EXPLAIN QUERY PLAN SELECT device_id, record, last_seen, expires_at FROM "
            "registrations WHERE device_id>? AND expires_at>? ORDER BY device_id LIMIT ?",
            ("", 0.0, 10)).fetchall()
        return " | ".join(str(r[-1]) for r in rows)
