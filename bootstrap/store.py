"""SQLite registry of the bootstrap server: who registered, with which record, until when.

Two tables:

* ``registrations``: one row per device id (canonical peer id text, or a legacy
  bare id) with its contact record as compact JSON text (NULL for legacy ids),
  ``last_seen`` and ``expires_at`` (unix seconds), the ``source`` it registered
  from (the client's address key, see bootstrap.limits.source_key) and its
  ``slot`` there. ``page()`` is keyset paging over the (slot, device_id) index:
  a page costs O(limit) whatever the table size, never an OFFSET scan.
* ``replay_guard``: per peer id, the highest (seq, timestamp) ever accepted and
  the timestamp of the last signed unregister. It outlives the registration
  (kept ``GUARD_KEEP_S``, the longest a contact record can live), so an old
  record or an old unregister request replayed after expiry or deletion is
  still recognised as stale.

Fair listing: each source numbers the ids it holds 0, 1, 2, ... (a freed
number is reused first), and listings are ordered by (slot, device_id): every
source's first id, then every source's second, and so on. One address that
registers 20,000 ids therefore holds one place in each round and cannot push
the ids of other addresses out of the first page, whatever they are named.
A source's slots are stable while its ids stay registered, so cursors stay
valid. An id moves to another source only with a strictly newer signed record
(or, for an unsigned legacy id, by any registration): replaying somebody's
current record from elsewhere keeps it where it is. The legacy ids a source
may hold are capped (``max_legacy_per_source``); signed ids are bounded by
the server's per-source rate limit and the registration TTL.

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
import heapq
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from node.contact import MAX_RECORD_TTL_S
from node.errors import LocalIOError, P2PError, ProtocolError

SCHEMA_VERSION = 2
GUARD_KEEP_S = float(MAX_RECORD_TTL_S)
PURGE_BATCH_ROWS = 1000
SQLITE_BUSY_TIMEOUT_MS = 5000
# the server flushes queued registrations this often, or at FLUSH_MAX_ROWS
FLUSH_INTERVAL_S = 0.05
FLUSH_MAX_ROWS = 512
# most recently seen registrations kept in memory to answer others() without SQL:
# the newest RECENT_PER_SOURCE_MAX of each of the RECENT_SOURCES_MAX newest sources
RECENT_SOURCES_MAX = 1024
RECENT_PER_SOURCE_MAX = 64
# hard cap on rows (expired ones count until purged): bounds memory and disk against
# a flood of made-up legacy ids
MAX_REGISTRATIONS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (
    device_id  TEXT PRIMARY KEY,
    record     TEXT,
    last_seen  REAL NOT NULL,
    expires_at REAL NOT NULL,
    source     TEXT NOT NULL DEFAULT '',
    slot       INTEGER NOT NULL DEFAULT 0
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
# after the v1 -> v2 migration (the columns must exist first)
_ORDER_INDEX = ("CREATE INDEX IF NOT EXISTS registrations_order "
                "ON registrations(slot, device_id)")
_ROW_COLUMNS = "device_id, record, last_seen, expires_at, slot"


class StaleRegistration(ProtocolError):
    """A record or unregister request older than what the registry already accepted."""


class RegistryFull(P2PError):
    """The registry holds MAX_REGISTRATIONS rows; a new id cannot register until some expire."""


class TooManyLegacyIds(P2PError):
    """This source already holds ``max_legacy_per_source`` unsigned ids."""


class RegisterOutcome(enum.Enum):
    NEW = "new"            # not registered (or expired) before
    REFRESHED = "refreshed"  # was online; expiry pushed back


class UnregisterOutcome(enum.Enum):
    REMOVED = "removed"
    UNKNOWN = "unknown"    # no online registration under that id


@dataclass(frozen=True, slots=True)
class Registration:
    device_id: str
    record_json: str | None
    last_seen: float
    expires_at: float
    slot: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an id sits in the fair order: its source and its slot there."""

    source: str
    slot: int
    legacy: bool


class _SourceSlots:
    """The slots one source holds: a counter plus a heap of freed numbers."""

    __slots__ = ("free", "next_slot", "rows", "legacy")

    def __init__(self) -> None:
        self.free: list[int] = []
        self.next_slot = 0
        self.rows = 0
        self.legacy = 0

    def take(self) -> int:
        self.rows += 1
        if self.free:
            return heapq.heappop(self.free)
        self.next_slot += 1
        return self.next_slot - 1

    def give_back(self, slot: int) -> None:
        self.rows -= 1
        heapq.heappush(self.free, slot)


class RegistryStore:
    """The registry file plus its in-memory hot state. Use it from one thread only."""

    def __init__(self, path: Path, *, max_registrations: int = MAX_REGISTRATIONS,
                 max_legacy_per_source: int = 0) -> None:
        self.path = path
        self.max_registrations = max_registrations
        # 0 = unlimited
        self.max_legacy_per_source = max_legacy_per_source
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
            if row is not None and row[0] == "1":
                self._migrate_v1()
                row = (str(SCHEMA_VERSION),)
            if row is not None and row[0] == str(SCHEMA_VERSION):
                self._db.execute(_ORDER_INDEX)
        except (sqlite3.Error, OSError) as exc:
            raise LocalIOError(f"cannot open bootstrap registry {path}: {exc}") from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            self._db.close()
            raise LocalIOError(f"{path}: registry schema {row and row[0]!r} is not "
                               f"{SCHEMA_VERSION}; move the file away to start afresh")
        # device_id -> expires_at of every row in the file (expired ones until purged)
        self._expiry: dict[str, float] = {}
        # device_id -> its place in the fair order; source -> the slots it holds
        self._placed: dict[str, Placement] = {}
        self._sources: dict[str, _SourceSlots] = {}
        self._load_placements()
        # device_id -> (seq, timestamp, deleted_at)
        self._guard: dict[str, tuple[int, int, int]] = {
            d: (q, t, x) for d, q, t, x in self._db.execute(
                "SELECT device_id, seq, timestamp, deleted_at FROM replay_guard")}
        # source -> (device_id -> (record_json, expires_at)), oldest first at both levels
        self._recent: OrderedDict[str, OrderedDict[str, tuple[str | None, float]]] = \
            OrderedDict()
        self._load_recent()
        # queued writes: registration rows and guard rows, written by flush()
        self._pending_regs: dict[str, tuple[str, str | None, float, float, str, int]] = {}
        self._pending_guard: dict[str, tuple[str, int, int, int, float]] = {}

    def _migrate_v1(self) -> None:
        """Schema 1 had no source/slot: old rows become source '' in device_id order."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("ALTER TABLE registrations ADD COLUMN source TEXT NOT NULL DEFAULT ''")
            db.execute("ALTER TABLE registrations ADD COLUMN slot INTEGER NOT NULL DEFAULT 0")
            ids = [d for (d,) in db.execute(
                "SELECT device_id FROM registrations ORDER BY device_id")]
            db.executemany("UPDATE registrations SET slot=? WHERE device_id=?",
                           ((i, d) for i, d in enumerate(ids)))
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _load_placements(self) -> None:
        used: dict[str, list[int]] = {}
        for device_id, expires_at, source, slot, legacy in self._db.execute(
                "SELECT device_id, expires_at, source, slot, record IS NULL "
                "FROM registrations"):
            self._expiry[device_id] = expires_at
            self._placed[device_id] = Placement(source, slot, bool(legacy))
            used.setdefault(source, []).append(slot)
            slots = self._sources.get(source)
            if slots is None:
                slots = self._sources[source] = _SourceSlots()
            slots.rows += 1
            slots.legacy += bool(legacy)
        for source, taken in used.items():
            slots = self._sources[source]
            slots.next_slot = max(taken) + 1
            have = set(taken)
            slots.free = [s for s in range(slots.next_slot) if s not in have]
            heapq.heapify(slots.free)

    def _load_recent(self) -> None:
        rows = self._db.execute(
            "SELECT device_id, record, expires_at FROM registrations "
            "ORDER BY last_seen DESC LIMIT ?", (RECENT_SOURCES_MAX * 4,)).fetchall()
        self._recent = OrderedDict()
        for device_id, record_json, expires_at in reversed(rows):
            self._remember(device_id, record_json, expires_at)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()

    # -- placement and the recent ring ---------------------------------------------
    def placement(self, device_id: str) -> Placement | None:
        return self._placed.get(device_id)

    def source_rows(self, source: str) -> tuple[int, int]:
        """(ids, legacy ids) a source holds, expired ones included until purged."""
        slots = self._sources.get(source)
        return (0, 0) if slots is None else (slots.rows, slots.legacy)

    def _place(self, device_id: str, source: str, legacy: bool) -> Placement:
        slots = self._sources.get(source)
        if slots is None:
            slots = self._sources[source] = _SourceSlots()
        where = Placement(source, slots.take(), legacy)
        slots.legacy += legacy
        self._placed[device_id] = where
        return where

    def _release(self, device_id: str) -> None:
        where = self._placed.pop(device_id, None)
        if where is None:
            return
        slots = self._sources[where.source]
        slots.give_back(where.slot)
        slots.legacy -= where.legacy
        if slots.rows <= 0:
            del self._sources[where.source]
        inner = self._recent.get(where.source)
        if inner is not None:
            inner.pop(device_id, None)
            if not inner:
                del self._recent[where.source]

    def _remember(self, device_id: str, record_json: str | None, expires_at: float) -> None:
        where = self._placed.get(device_id)
        if where is None:
            return
        inner = self._recent.pop(where.source, None)
        if inner is None:
            inner = OrderedDict()
        inner.pop(device_id, None)
        inner[device_id] = (record_json, expires_at)
        if len(inner) > RECENT_PER_SOURCE_MAX:
            inner.popitem(last=False)
        self._recent[where.source] = inner
        if len(self._recent) > RECENT_SOURCES_MAX:
            self._recent.popitem(last=False)

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
                    "INSERT INTO registrations(device_id, record, last_seen, expires_at, "
                    "source, slot) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE "
                    "SET record=excluded.record, last_seen=excluded.last_seen, "
                    "expires_at=excluded.expires_at, source=excluded.source, "
                    "slot=excluded.slot",
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
                 timestamp: int | None = None, source: str = "") -> RegisterOutcome:
        """Insert or refresh a registration; with seq/timestamp, enforce the replay guard.

        Raises StaleRegistration when (seq, timestamp) is lower than the highest
        accepted for this id, or the record predates the last signed unregister;
        RegistryFull when a new id would exceed ``max_registrations``;
        TooManyLegacyIds when ``source`` already holds its cap of legacy ids. The
        row is queued; it is in the file after the next ``flush()``.
        """
        if device_id not in self._expiry and len(self._expiry) >= self.max_registrations:
            raise RegistryFull(f"the registry is full ({self.max_registrations} registrations)")
        legacy = record_json is None
        where = self._placed.get(device_id)
        newer_record = False
        guard_row: tuple[int, int, int] | None = None
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
            newer_record = guard is None or (seq, timestamp) > (guard[0], guard[1])
            guard_row = (seq, timestamp, deleted_at)
        # move to this source: a new id, a legacy id (anyone may register those), or a
        # strictly newer signed record; a replayed current record stays where it is
        moving = where is None or (where.source != source and (legacy or newer_record))
        if moving and legacy and self.max_legacy_per_source > 0:
            held = self._sources.get(source)
            if held is not None and held.legacy >= self.max_legacy_per_source:
                raise TooManyLegacyIds(
                    f"this address already holds {self.max_legacy_per_source} unsigned "
                    "device ids; register with a signed p2pfs peer id, or let some expire")
        if guard_row is not None:
            self._guard[device_id] = guard_row
            self._pending_guard[device_id] = (device_id, *guard_row, now + GUARD_KEEP_S)
        if moving:
            self._release(device_id)
            where = self._place(device_id, source, legacy)
        assert where is not None
        if where.legacy != legacy:  # a legacy id now sent with a record, or the reverse
            self._sources[where.source].legacy += legacy - where.legacy
            where = self._placed[device_id] = Placement(where.source, where.slot, legacy)
        was_online = self._expiry.get(device_id, 0.0) > now
        self._expiry[device_id] = expires_at
        self._pending_regs[device_id] = (device_id, record_json, now, expires_at,
                                         where.source, where.slot)
        self._remember(device_id, record_json, expires_at)
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
        self._release(device_id)
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
            self._release(device_id)
        old_guards = self._db.execute(
            "DELETE FROM replay_guard WHERE device_id IN (SELECT device_id FROM "
            "replay_guard WHERE keep_until<=? LIMIT ?) RETURNING device_id",
            (now, batch_rows)).fetchall()
        for (device_id,) in old_guards:
            self._guard.pop(device_id, None)
        return len(gone) + len(old_guards)

    def bulk_load(self, rows: Iterable[tuple[str, str | None, float, float]], *,
                  source: str = "") -> None:
        """Insert (device_id, record_json, last_seen, expires_at) rows in one transaction.

        For benchmarks and imports only: no replay guard, no caps; every row is
        placed under ``source``.
        """
        self.flush()
        out = []
        for device_id, record_json, last_seen, expires_at in rows:
            where = self._placed.get(device_id)
            if where is None or where.source != source:
                self._release(device_id)
                where = self._place(device_id, source, record_json is None)
            out.append((device_id, record_json, last_seen, expires_at, source, where.slot))
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO registrations VALUES (?, ?, ?, ?, ?, ?)",
                           out)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._expiry.update((r[0], r[3]) for r in out)
        self._load_recent()

    # -- reads --------------------------------------------------------------
    def get(self, device_id: str, *, now: float) -> Registration | None:
        self.flush()
        row = self._db.execute(
            f"SELECT {_ROW_COLUMNS} FROM registrations "
            "WHERE device_id=? AND expires_at>?", (device_id, now)).fetchone()
        return Registration(*row) if row else None

    def others(self, device_id: str, limit: int, *, now: float) -> list[tuple[str, str | None]]:
        """Up to ``limit`` other online registrations, fairly across sources.

        Round robin over sources, most recently active source first, each
        source's newest registration first: one busy source gets at most
        ceil(limit / sources) of the answer. Served from memory (the newest
        RECENT_PER_SOURCE_MAX ids of each of the RECENT_SOURCES_MAX newest sources).
        """
        out: list[tuple[str, str | None]] = []
        if limit <= 0:
            return out

        def take_one(it: Iterator[tuple[str, tuple[str | None, float]]]) -> bool:
            for other, (record_json, expires_at) in it:
                if other != device_id and expires_at > now:
                    out.append((other, record_json))
                    return True
            return False

        active: list[Iterator[tuple[str, tuple[str | None, float]]]] = []
        for inner in reversed(self._recent.values()):
            it = reversed(inner.items())
            if take_one(it):
                active.append(it)
                if len(out) >= limit:
                    return out
        while active:
            still = []
            for it in active:
                if take_one(it):
                    still.append(it)
                    if len(out) >= limit:
                        return out
            active = still
        return out

    def page(self, limit: int, after: tuple[int, str] | None, *,
             now: float) -> list[Registration]:
        """Online registrations after the (slot, device_id) key ``after``, in that order."""
        self.flush()
        if after is None:
            rows = self._db.execute(
                f"SELECT {_ROW_COLUMNS} FROM registrations "
                "WHERE expires_at>? ORDER BY slot, device_id LIMIT ?", (now, limit)).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {_ROW_COLUMNS} FROM registrations "
                "WHERE (slot, device_id)>(?, ?) AND expires_at>? "
                "ORDER BY slot, device_id LIMIT ?",
                (after[0], after[1], now, limit)).fetchall()
        return [Registration(*r) for r in rows]

    def page_items(self, limit: int, after: tuple[int, str] | None, *,
                   now: float) -> list[tuple[int, str, str]]:
        """``page()`` as (slot, device_id, JSON text of the listing item) rows.

        SQLite writes each item (``{"device_id", "record", "last_seen"}``, the stored
        record spliced in as it is) itself, so a 1,000-row listing costs no Python
        object or string formatting per row: GET /peers' hot path under a flood.
        """
        self.flush()
        item = ("""'{"device_id":'||json_quote(device_id)||',"record":'||"""
                """coalesce(record,'null')||',"last_seen":'||round(last_seen,3)||'}'""")
        if after is None:
            rows = self._db.execute(
                f"SELECT slot, device_id, {item} FROM registrations "
                "WHERE expires_at>? ORDER BY slot, device_id LIMIT ?", (now, limit)).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT slot, device_id, {item} FROM registrations "
                "WHERE (slot, device_id)>(?, ?) AND expires_at>? "
                "ORDER BY slot, device_id LIMIT ?",
                (after[0], after[1], now, limit)).fetchall()
        return rows

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
        """The query plan of a keyset page (a test checks it uses the order index)."""
        rows = self._db.execute(
            f"EXPLAIN QUERY PLAN SELECT {_ROW_COLUMNS} FROM registrations "
            "WHERE (slot, device_id)>(?, ?) AND expires_at>? ORDER BY slot, device_id LIMIT ?",
            (0, "", 0.0, 10)).fetchall()
        return " | ".join(str(r[-1]) for r in rows)
