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

Registrations are the hot path (thousands a second), so the store keeps the
small per-id state in memory (expiry of every row, the replay guard, a ring of
the most recently seen registrations for ``others()``) and writes registrations
behind in batches: ``register()`` only queues the row, ``flush()`` writes the
queue in one transaction. The server flushes every ``FLUSH_INTERVAL_S``; every
method that reads SQL (``page``, ``get``, counts, purge, unregister) flushes
first, so reads always see every accepted registration. A crash loses at most
the last flush interval of refreshes, which nodes repeat anyway.

Every method takes ``now`` from the caller (no clock inside); the server calls
them on its event loop thread. The store
knows nothing of HTTP or signatures: the caller has verified records first.
Imports nothing of the project except errors and contact (for a constant).
"""

from __future__ import annotations

import enum
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.contact import MAX_RECORD_TTL_S
from node.errors import LocalIOError, P2PError, ProtocolError

SCHEMA_VERSION = 1
GUARD_KEEP_S = float(MAX_RECORD_TTL_S)
PURGE_BATCH_ROWS = 1000
SQLITE_BUSY_TIMEOUT_MS = 5000
# the server flushes queued registrations this often, or at FLUSH_MAX_ROWS
FLUSH_INTERVAL_S = 0.05
FLUSH_MAX_ROWS = 512
# most recently seen registrations kept in memory to answer others() without SQL
RECENT_RING_MAX = 1024
# hard cap on rows (expired ones count until purged): bounds memory and disk against
# a flood of made-up legacy ids
MAX_REGISTRATIONS = 1_000_000

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


class RegistryFull(P2PError):
    """The registry holds MAX_REGISTRATIONS rows; a new id cannot register until some expire."""


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
    """The registry file plus its in-memory hot state. Use it from one thread only."""

    def __init__(self, path: Path, *, max_registrations: int = MAX_REGISTRATIONS) -> None:
        self.path = path
        self.max_registrations = max_registrations
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
        # device_id -> expires_at of every row in the file (expired ones until purged)
        self._expiry: dict[str, float] = dict(
            self._db.execute("SELECT device_id, expires_at FROM registrations"))
        # device_id -> (seq, timestamp, deleted_at)
        self._guard: dict[str, tuple[int, int, int]] = {
            d: (q, t, x) for d, q, t, x in self._db.execute(
                "SELECT device_id, seq, timestamp, deleted_at FROM replay_guard")}
        # device_id -> (record_json, expires_at), oldest first
        self._recent: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._load_recent()
        # queued writes: registration rows and guard rows, written by flush()
        self._pending_regs: dict[str, tuple[str, str | None, float, float]] = {}
        self._pending_guard: dict[str, tuple[str, int, int, int, float]] = {}

    def _load_recent(self) -> None:
        rows = self._db.execute(
            "SELECT device_id, record, expires_at FROM registrations "
            "ORDER BY last_seen DESC LIMIT ?", (RECENT_RING_MAX,)).fetchall()
        self._recent = OrderedDict((d, (r, e)) for d, r, e in reversed(rows))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()

    # -- write-behind -----------------------------------------------------------
    @property
    def pending_rows(self) -> int:
        return len(self._pending_regs) + len(self._pending_guard)

    def flush(self) -> int:
        """Write queued registrations in one transaction; returns how many rows."""
        if not self._pending_regs and not self._pending_guard:
            return 0
        regs, guards = self._pending_regs, self._pending_guard
        self._pending_regs, self._pending_guard = {}, {}
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO replay_guard(device_id, seq, timestamp, deleted_at, keep_until) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                    "seq=excluded.seq, timestamp=excluded.timestamp, "
                    "deleted_at=excluded.deleted_at, keep_until=excluded.keep_until",
                    guards.values())
                db.executemany(
                    "INSERT INTO registrations(device_id, record, last_seen, expires_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                    "record=excluded.record, last_seen=excluded.last_seen, "
                    "expires_at=excluded.expires_at",
                    regs.values())
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LocalIOError(f"cannot write bootstrap registry {self.path}: {exc}") from None
        return len(regs) + len(guards)

    # -- writes -------------------------------------------------------------
    def register(self, device_id: str, record_json: str | None, *, now: float,
                 expires_at: float, seq: int | None = None,
                 timestamp: int | None = None) -> RegisterOutcome:
        """Insert or refresh a registration; with seq/timestamp, enforce the replay guard.

        Raises StaleRegistration when (seq, timestamp) is lower than the highest
        accepted for this id, or the record predates the last signed unregister;
        RegistryFull when a new id would exceed ``max_registrations``. The row is queued;
        it is in the file after the next ``flush()``.
        """
        if device_id not in self._expiry and len(self._expiry) >= self.max_registrations:
            raise RegistryFull(f"the registry is full ({self.max_registrations} registrations)")
        if seq is not None and timestamp is not None:
            deleted_at = 0
            guard = self._guard.get(device_id)
            if guard is not None:
                g_seq, g_ts, deleted_at = guard
                if (seq, timestamp) < (g_seq, g_ts):
                    raise StaleRegistration(
                        f"record seq {seq} is older than the registered seq {g_seq} "
                        "(replayed or stale record)")
                if timestamp < deleted_at:
                    raise StaleRegistration("record predates this peer's last signed unregister")
            self._guard[device_id] = (seq, timestamp, deleted_at)
            self._pending_guard[device_id] = (device_id, seq, timestamp, deleted_at,
                                              now + GUARD_KEEP_S)
        was_online = self._expiry.get(device_id, 0.0) > now
        self._expiry[device_id] = expires_at
        self._pending_regs[device_id] = (device_id, record_json, now, expires_at)
        self._recent.pop(device_id, None)
        self._recent[device_id] = (record_json, expires_at)
        if len(self._recent) > RECENT_RING_MAX:
            self._recent.popitem(last=False)
        return RegisterOutcome.REFRESHED if was_online else RegisterOutcome.NEW

    def unregister(self, device_id: str, *, now: float,
                   signed_timestamp: int | None = None) -> UnregisterOutcome:
        """Remove an online registration.

        With ``signed_timestamp`` (a peer id's signed request) the request must be
        newer than the registered record and than the last unregister, else
        StaleRegistration: a captured request cannot be replayed later.
        """
        if not self._expiry.get(device_id, 0.0) > now:
            return UnregisterOutcome.UNKNOWN
        if signed_timestamp is not None:
            seq, ts, deleted_at = self._guard.get(device_id, (0, 0, 0))
            if signed_timestamp < ts or signed_timestamp <= deleted_at:
                raise StaleRegistration(
                    "unregister request is older than the current registration")
            self._guard[device_id] = (seq, ts, signed_timestamp)
            self._pending_guard[device_id] = (device_id, seq, ts, signed_timestamp,
                                              now + GUARD_KEEP_S)
        self.flush()
        try:
            self._db.execute("DELETE FROM registrations WHERE device_id=?", (device_id,))
        except sqlite3.Error as exc:
            raise LocalIOError(f"cannot write bootstrap registry {self.path}: {exc}") from None
        self._expiry.pop(device_id, None)
        self._recent.pop(device_id, None)
        return UnregisterOutcome.REMOVED

    def purge_expired(self, now: float, *, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        """Delete up to ``batch_rows`` expired registrations and stale guards; returns rows."""
        self.flush()
        gone = self._db.execute(
            "DELETE FROM registrations WHERE device_id IN (SELECT device_id FROM "
            "registrations WHERE expires_at<=? LIMIT ?) RETURNING device_id",
            (now, batch_rows)).fetchall()
        for (device_id,) in gone:
            self._expiry.pop(device_id, None)
            self._recent.pop(device_id, None)
        old_guards = self._db.execute(
            "DELETE FROM replay_guard WHERE device_id IN (SELECT device_id FROM "
            "replay_guard WHERE keep_until<=? LIMIT ?) RETURNING device_id",
            (now, batch_rows)).fetchall()
        for (device_id,) in old_guards:
            self._guard.pop(device_id, None)
        return len(gone) + len(old_guards)

    def bulk_load(self, rows: Iterable[tuple[str, str | None, float, float]]) -> None:
        """Insert (device_id, record_json, last_seen, expires_at) rows in one transaction.

        For benchmarks and imports only: no replay guard, no checks.
        """
        self.flush()
        rows = list(rows)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO registrations VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._expiry.update((d, exp) for d, _, _, exp in rows)
        self._load_recent()

    # -- reads --------------------------------------------------------------
    def get(self, device_id: str, *, now: float) -> Registration | None:
        self.flush()
        row = self._db.execute(
            "SELECT device_id, record, last_seen, expires_at FROM registrations "
            "WHERE device_id=? AND expires_at>?", (device_id, now)).fetchone()
        return Registration(*row) if row else None

    def others(self, device_id: str, limit: int, *, now: float) -> list[tuple[str, str | None]]:
        """Up to ``limit`` other online registrations, most recently seen first.

        Served from the in-memory ring of the RECENT_RING_MAX newest registrations.
        """
        out: list[tuple[str, str | None]] = []
        for other, (record_json, expires_at) in reversed(self._recent.items()):
            if other != device_id and expires_at > now:
                out.append((other, record_json))
                if len(out) >= limit:
                    break
        return out

    def page(self, limit: int, after: str | None, *, now: float) -> list[Registration]:
        """Online registrations with device_id > ``after``, in device_id order."""
        self.flush()
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
        self.flush()
        row = self._db.execute(
            "SELECT count(*) FROM registrations WHERE expires_at>?", (now,)).fetchone()
        return int(row[0])

    def count_rows(self) -> int:
        """All registration rows, expired ones included (tests and purge checks)."""
        self.flush()
        return int(self._db.execute("SELECT count(*) FROM registrations").fetchone()[0])

    def explain_page(self) -> str:
        """The query plan of a keyset page (a test checks it uses the primary key)."""
        rows = self._db.execute(
            "EXPLAIN QUERY PLAN SELECT device_id, record, last_seen, expires_at FROM "
            "registrations WHERE device_id>? AND expires_at>? ORDER BY device_id LIMIT ?",
            ("", 0.0, 10)).fetchall()
        return " | ".join(str(r[-1]) for r in rows)
