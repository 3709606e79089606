"""The event log: every accepted change event, our own counters, and notifications.

One SQLite file (stdlib sqlite3, WAL) per node, used from the event-loop thread
only (each call is a short local transaction). Tables:

* ``events``: signed events by id, unique on (origin, seq). ``relay_only`` marks
  events from origins we do not trust: they are kept so we can pass them on
  (anti-entropy) but never shown by ``query`` or acted upon.
* ``watermarks``: per origin, the highest seq n such that 1..n are all present
  (the "contiguous highest"). Anti-entropy digests carry these, so a gap left
  by a lost push is pulled again. For an untrusted origin it is a high-water
  mark instead (the highest seq ever stored, gaps or not): we only relay such
  events, best effort, and a gapless mark would make every peer re-send what
  the caps below pruned, forever.
* ``relay_origins``: one row per untrusted origin we store events for (or
  stored, recently): how many relay-only events and bytes we hold, the highest
  seq we pruned (older copies are refused), and when it was last active. It
  enforces the relay caps in O(1) per event (see ``RELAY_ONLY_*``): per origin
  the oldest events go first; over the total or origin caps the least recently
  active untrusted origin loses all its events but keeps its row as a
  tombstone (so its watermark still tells peers not to re-send them); the
  oldest tombstones are forgotten beyond ``RELAY_ONLY_ORIGINS_REMEMBERED_MAX``.
  Trusted origins' events are never evicted.
* ``rejected``: events refused (bad signature, reused seq, oversize...), for audit.
* ``local``: our own next seq and Lamport clock, persisted.
* ``notifications``: what `node events` streams; ids go up by exactly one
  (AUTOINCREMENT, never rolled back without the row), so a client that
  reconnects with ``since=N`` can tell whether it missed something.

Imports node.gossip.events, node.identity, node.notifications, node.wire and
node.errors only; it
must not import the engine, the service or any transport.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ConfigError, LocalIOError, ProtocolError
from node.gossip.events import MAX_SEQ, ChangeEvent, now_ms
from node.identity import Identity, PeerId
from node.notifications import NOTIFICATION_KINDS, Notice
from node.statefiles import private_file
from node.wire import packb, unpackb

MISSING_BATCH_MAX = 256
QUERY_LIMIT_MAX = 10_000
NOTIFICATION_LIMIT_MAX = 10_000
MAX_NOTIFICATION_BYTES = 8192
# bounded audit/notification tables: old rows are pruned, ids keep counting up
NOTIFICATIONS_KEEP = 100_000
REJECTED_KEEP = 10_000
PRUNE_EVERY = 1000
# Events we only relay (untrusted origin) are capped, so strangers with valid keys,
# or a trusted peer relaying thousands of them, cannot fill our disk or our digests.
# An event is ~250 bytes with a short path (4096 at most): the per-origin caps keep
# a few hundred recent changes of one origin, the totals bound the whole relay
# store to ~2 MiB whatever the number of origins.
RELAY_ONLY_MAX_EVENTS_PER_ORIGIN = 256
RELAY_ONLY_MAX_BYTES_PER_ORIGIN = 256 * 1024
RELAY_ONLY_MAX_ORIGINS = 256  # untrusted origins whose events we hold at once
RELAY_ONLY_MAX_EVENTS_TOTAL = 4096
RELAY_ONLY_MAX_BYTES_TOTAL = 2 * 1024 * 1024
# evicted untrusted origins keep a ~100-byte tombstone (their high-water mark, so
# peers do not re-send what we evicted; ~45 bytes each in every digest we send);
# beyond this many the oldest are forgotten
RELAY_ONLY_ORIGINS_REMEMBERED_MAX = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id BLOB PRIMARY KEY,
    origin BLOB NOT NULL,
    seq INTEGER NOT NULL,
    lamport INTEGER NOT NULL,
    wall_ms INTEGER NOT NULL,
    folder TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    old_path TEXT NOT NULL,
    raw BLOB NOT NULL,
    relay_only INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    UNIQUE (origin, seq)
);
CREATE INDEX IF NOT EXISTS events_wall ON events (wall_ms);
CREATE TABLE IF NOT EXISTS watermarks (
    origin BLOB PRIMARY KEY,
    contiguous INTEGER NOT NULL,
    highest INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_origins (
    origin BLOB PRIMARY KEY,
    events INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    floor INTEGER NOT NULL,
    active INTEGER NOT NULL,
    mixed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS relay_origins_active ON relay_origins (active);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    origin BLOB,
    seq INTEGER,
    event_id BLOB,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS local (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data BLOB NOT NULL
);
"""


class AddOutcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"  # same (origin, seq), different event: a reused sequence number
    PRUNED = "pruned"  # an untrusted origin's event at or below what we pruned of it


@dataclass(frozen=True, slots=True)
class LogStats:
    """What the log holds, from counters kept up to date on every write: O(1) to read."""

    events: int
    relay_only_events: int
    relay_only_bytes: int
    relay_only_origins: int  # untrusted origins whose events we hold
    relay_only_origins_remembered: int  # ... plus tombstones of evicted ones
    relay_only_pruned: int  # relay-only events evicted since the log was opened

    def to_json(self) -> dict[str, int]:
        return {"events": self.events, "relay_only_events": self.relay_only_events,
                "relay_only_bytes": self.relay_only_bytes,
                "relay_only_origins": self.relay_only_origins,
                "relay_only_origins_remembered": self.relay_only_origins_remembered,
                "relay_only_pruned": self.relay_only_pruned}


@dataclass(frozen=True)
class Notification:
    id: int
    at_ms: int
    kind: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "at_ms": self.at_ms, "kind": self.kind, "data": self.data}


class EventLog:
    """SQLite-backed event log; see the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(str(private_file(path)), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LocalIOError(f"cannot open event log {path}: {exc}") from None
        self._listeners: list[Callable[[Notification], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        # AUTOINCREMENT: sqlite_sequence remembers the last id even after pruning
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM notifications").fetchone()
        seq_row = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name='notifications'").fetchone()
        self._last_notification_id: int = max(row[0], seq_row[0] if seq_row else 0)
        self._count_relay_events_of_older_logs()
        # counters behind stats(): one full count when the log is opened, then kept up
        # to date by every write, so `node status` never scans the log
        self._events_total: int = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        agg = self._db.execute(
            "SELECT COALESCE(SUM(events), 0), COALESCE(SUM(bytes), 0),"
            " COALESCE(SUM(events > 0), 0), COUNT(*), COALESCE(MAX(active), 0)"
            " FROM relay_origins").fetchone()
        self._relay_events: int = agg[0]
        self._relay_bytes: int = agg[1]
        self._relay_origins: int = agg[2]
        self._relay_remembered: int = agg[3]
        self._relay_clock: int = agg[4]
        self._relay_pruned = 0

    def _count_relay_events_of_older_logs(self) -> None:
        """Once per log file: relay-only events stored before ``relay_origins`` existed
        get their rows, so the caps see (and on the next add, evict) them too."""
        if self._get_local("relay_origins_v1"):
            return
        with self._tx():
            self._db.execute(
                "INSERT OR IGNORE INTO relay_origins (origin, events, bytes, floor, active, mixed)"
                " SELECT e.origin, COUNT(*), SUM(length(e.raw)), 0, 0, EXISTS(SELECT 1 FROM"
                " events t WHERE t.origin = e.origin AND t.relay_only = 0)"
                " FROM events e WHERE e.relay_only = 1 GROUP BY e.origin")
            self._set_local("relay_origins_v1", 1)

    def close(self) -> None:
        self._db.close()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    # -- events --------------------------------------------------------------
    def add(self, event: ChangeEvent, *, relay_only: bool = False) -> AddOutcome:
        """Store a verified event. A reused (origin, seq) is refused and recorded.

        `relay_only` (untrusted origin): stored within the ``RELAY_ONLY_*`` caps,
        evicting this origin's oldest events, then the least recently active
        untrusted origins; an event at or below what we pruned of its origin is
        refused as PRUNED (not stored, not relayed again).
        """
        db = self._db
        origin = event.origin.key
        if db.execute("SELECT 1 FROM events WHERE id=?", (event.id,)).fetchone():
            return AddOutcome.DUPLICATE
        row = db.execute("SELECT id FROM events WHERE origin=? AND seq=?",
                         (origin, event.seq)).fetchone()
        if row is not None:
            self.record_rejected(event.origin, event.seq, event.id,
                                 "sequence number reused with different content")
            return AddOutcome.CONFLICT
        if relay_only:
            floor = db.execute("SELECT floor FROM relay_origins WHERE origin=?",
                               (origin,)).fetchone()
            if floor is not None and event.seq <= floor[0]:
                return AddOutcome.PRUNED
        raw = event.encode()
        counters = self._counters()
        try:
            with self._tx():
                db.execute(
                    "INSERT INTO events (id, origin, seq, lamport, wall_ms, folder, kind, path,"
                    " old_path, raw, relay_only, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (event.id, origin, event.seq, event.lamport, event.wall_ms,
                     event.folder, event.kind, event.path, event.old_path, raw,
                     int(relay_only), now_ms()))
                self._events_total += 1
                self._advance_watermark(origin, event.seq, high_water=relay_only)
                if relay_only:
                    self._admit_relay(origin, len(raw))
                    kept = db.execute("SELECT 1 FROM events WHERE id=?",
                                      (event.id,)).fetchone() is not None
                else:
                    # an untrusted origin must not be able to push our clock around
                    self._observe_lamport(event.lamport)
                    db.execute("UPDATE relay_origins SET mixed=1 WHERE origin=?", (origin,))
                    kept = True
        except BaseException:
            self._restore_counters(counters)
            raise
        return AddOutcome.NEW if kept else AddOutcome.PRUNED

    # -- relay caps (untrusted origins) -------------------------------------------
    def _admit_relay(self, origin: bytes, size_bytes: int) -> None:
        """Count one new relay-only event of `origin`, then evict down to the caps."""
        db = self._db
        self._relay_clock += 1
        row = db.execute("SELECT events FROM relay_origins WHERE origin=?",
                         (origin,)).fetchone()
        if row is None:
            mixed = db.execute("SELECT 1 FROM events WHERE origin=? AND relay_only=0 LIMIT 1",
                               (origin,)).fetchone() is not None
            db.execute("INSERT INTO relay_origins (origin, events, bytes, floor, active, mixed)"
                       " VALUES (?,1,?,0,?,?)", (origin, size_bytes, self._relay_clock,
                                                 int(mixed)))
            self._relay_remembered += 1
            self._relay_origins += 1
        else:
            if row[0] == 0:
                self._relay_origins += 1  # a tombstone comes back to life
            db.execute("UPDATE relay_origins SET events=events+1, bytes=bytes+?, active=?"
                       " WHERE origin=?", (size_bytes, self._relay_clock, origin))
        self._relay_events += 1
        self._relay_bytes += size_bytes
        events, nbytes = db.execute("SELECT events, bytes FROM relay_origins WHERE origin=?",
                                    (origin,)).fetchone()
        if events > RELAY_ONLY_MAX_EVENTS_PER_ORIGIN or nbytes > RELAY_ONLY_MAX_BYTES_PER_ORIGIN:
            self._prune_oldest(origin, events - RELAY_ONLY_MAX_EVENTS_PER_ORIGIN,
                               nbytes - RELAY_ONLY_MAX_BYTES_PER_ORIGIN)
        while (self._relay_events > RELAY_ONLY_MAX_EVENTS_TOTAL
               or self._relay_bytes > RELAY_ONLY_MAX_BYTES_TOTAL
               or self._relay_origins > RELAY_ONLY_MAX_ORIGINS):
            lru = db.execute("SELECT origin FROM relay_origins WHERE events>0 AND origin<>?"
                             " ORDER BY active LIMIT 1", (origin,)).fetchone()
            if lru is None:  # only `origin` left, and it fits its own caps
                break
            self._evict_origin(lru[0])
        while self._relay_remembered > RELAY_ONLY_ORIGINS_REMEMBERED_MAX:
            old = db.execute("SELECT origin, mixed FROM relay_origins WHERE events=0"
                             " ORDER BY active LIMIT 1").fetchone()
            if old is None:
                break
            db.execute("DELETE FROM relay_origins WHERE origin=?", (old[0],))
            if not old[1]:  # the watermark of an origin we never trusted goes too
                db.execute("DELETE FROM watermarks WHERE origin=?", (old[0],))
            self._relay_remembered -= 1

    def _prune_oldest(self, origin: bytes, excess_events: int, excess_bytes: int) -> None:
        """Delete `origin`'s oldest relay-only events until both excesses are paid."""
        db = self._db
        doomed: list[bytes] = []
        freed_bytes = 0
        top = 0
        for eid, seq, size in db.execute(
                "SELECT id, seq, length(raw) FROM events WHERE origin=? AND relay_only=1"
                " ORDER BY seq", (origin,)).fetchall():  # at most the per-origin cap + 1
            if len(doomed) >= excess_events and freed_bytes >= excess_bytes:
                break
            doomed.append(eid)
            freed_bytes += size
            top = seq
        db.executemany("DELETE FROM events WHERE id=?", [(eid,) for eid in doomed])
        db.execute("UPDATE relay_origins SET events=events-?, bytes=bytes-?,"
                   " floor=MAX(floor, ?) WHERE origin=?", (len(doomed), freed_bytes, top, origin))
        self._note_pruned(len(doomed), freed_bytes)

    def _evict_origin(self, origin: bytes) -> None:
        """Drop every relay-only event of `origin`; its row stays as a tombstone."""
        db = self._db
        events, nbytes = db.execute("SELECT events, bytes FROM relay_origins WHERE origin=?",
                                    (origin,)).fetchone()
        top = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE origin=? AND"
                         " relay_only=1", (origin,)).fetchone()[0]
        db.execute("DELETE FROM events WHERE origin=? AND relay_only=1", (origin,))
        db.execute("UPDATE relay_origins SET events=0, bytes=0, floor=MAX(floor, ?)"
                   " WHERE origin=?", (top, origin))
        self._relay_origins -= 1
        self._note_pruned(events, nbytes)

    def _note_pruned(self, events: int, nbytes: int) -> None:
        self._events_total -= events
        self._relay_events -= events
        self._relay_bytes -= nbytes
        self._relay_pruned += events

    def _counters(self) -> tuple[int, ...]:
        return (self._events_total, self._relay_events, self._relay_bytes, self._relay_origins,
                self._relay_remembered, self._relay_clock, self._relay_pruned)

    def _restore_counters(self, saved: tuple[int, ...]) -> None:
        (self._events_total, self._relay_events, self._relay_bytes, self._relay_origins,
         self._relay_remembered, self._relay_clock, self._relay_pruned) = saved

    def stats(self) -> LogStats:
        """Counts of what the log holds, O(1): no query runs."""
        return LogStats(self._events_total, self._relay_events, self._relay_bytes,
                        self._relay_origins, self._relay_remembered, self._relay_pruned)

    def has(self, event_id: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM events WHERE id=?", (event_id,)).fetchone() \
            is not None

    def get(self, event_id: bytes) -> ChangeEvent | None:
        row = self._db.execute("SELECT raw FROM events WHERE id=?", (event_id,)).fetchone()
        return ChangeEvent.decode(row[0]) if row else None

    def _advance_watermark(self, origin: bytes, seq: int, *, high_water: bool = False) -> None:
        row = self._db.execute("SELECT contiguous, highest FROM watermarks WHERE origin=?",
                               (origin,)).fetchone()
        contiguous, highest = row if row else (0, 0)
        highest = max(highest, seq)
        if high_water:  # untrusted origin: see the module docstring
            contiguous = max(contiguous, highest)
        elif seq == contiguous + 1:
            contiguous = seq
            while self._db.execute("SELECT 1 FROM events WHERE origin=? AND seq=?",
                                   (origin, contiguous + 1)).fetchone():
                contiguous += 1
        self._db.execute(
            "INSERT INTO watermarks (origin, contiguous, highest) VALUES (?,?,?)"
            " ON CONFLICT(origin) DO UPDATE SET contiguous=excluded.contiguous,"
            " highest=excluded.highest", (origin, contiguous, highest))

    def watermark(self, origin: bytes) -> tuple[int, int]:
        """(contiguous highest, highest) seq held for one origin key."""
        row = self._db.execute("SELECT contiguous, highest FROM watermarks WHERE origin=?",
                               (origin,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def highest_seqs(self) -> dict[bytes, int]:
        """Per origin key: the contiguous highest seq (1..n all present)."""
        return dict(self._db.execute("SELECT origin, contiguous FROM watermarks"))

    def top_seqs(self) -> dict[bytes, int]:
        """Per origin key: the highest seq held, gaps or not."""
        return dict(self._db.execute("SELECT origin, highest FROM watermarks"))

    def digest_seqs(self, limit: int, *, untrusted_done: bool = False
                    ) -> list[tuple[bytes, int]]:
        """(origin key, watermark) for a digest, at most `limit`: trusted origins first,
        then untrusted ones (tombstones included) from the most recently active, so
        a flood of untrusted origins can never push a trusted one out of our digests.

        `untrusted_done` claims every untrusted origin we know as complete (MAX_SEQ):
        the follow-up digests of one exchange use it, so a peer's backlog of untrusted
        events costs us at most one batch per exchange, not its whole history.
        """
        return [(bytes(k), v) for k, v in self._db.execute(
            "SELECT w.origin, CASE WHEN ? AND r.origin IS NOT NULL AND r.mixed = 0"
            " THEN ? ELSE w.contiguous END FROM watermarks w"
            " LEFT JOIN relay_origins r ON r.origin = w.origin"
            " ORDER BY (r.origin IS NOT NULL AND r.mixed = 0), r.active DESC, w.origin"
            " LIMIT ?", (int(untrusted_done), MAX_SEQ, max(0, limit)))]

    def missing_for(self, their_highest: dict[bytes, int],
                    limit: int = MISSING_BATCH_MAX) -> list[ChangeEvent]:
        """Events the other side lacks (seq above its watermark), oldest first per origin.

        Origins we trust come first, then untrusted ones; within each group every
        origin gets a fair share of the batch, so one origin with a long history (or
        hundreds of untrusted ones) cannot starve the rest of a peer's catch-up.
        """
        limit = max(0, min(limit, MISSING_BATCH_MAX))
        groups: tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]] = ([], [])
        for origin, highest, relay, held in self._db.execute(
                "SELECT w.origin, w.highest, r.origin IS NOT NULL AND r.mixed = 0,"
                " r.origin IS NULL OR r.events > 0 OR r.mixed"
                " FROM watermarks w LEFT JOIN relay_origins r ON r.origin = w.origin"
                " ORDER BY w.origin").fetchall():
            theirs = their_highest.get(bytes(origin), 0)
            if held and highest > theirs:
                groups[1 if relay else 0].append((bytes(origin), theirs))
        out: list[ChangeEvent] = []
        for group in groups:
            while group and len(out) < limit:
                share = max(1, (limit - len(out)) // len(group))
                unfinished: list[tuple[bytes, int]] = []
                for origin, after in group:
                    take = min(share, limit - len(out))
                    if take <= 0:
                        break
                    rows = self._db.execute(
                        "SELECT seq, raw FROM events WHERE origin=? AND seq>? ORDER BY seq"
                        " LIMIT ?", (origin, after, take)).fetchall()
                    out.extend(ChangeEvent.decode(r[1]) for r in rows)
                    if len(rows) == take:
                        unfinished.append((origin, rows[-1][0]))
                group = unfinished
        return out

    def _matching(self, peer: PeerId | None, since_ms: int | None, path_glob: str | None,
                  include_relay_only: bool) -> Iterator[bytes]:
        """Raw accepted events matching the filters, newest first (by wall time, then
        Lamport): the one query behind `query` and `query_page`."""
        where: list[str] = [] if include_relay_only else ["relay_only=0"]
        args: list[Any] = []
        if peer is not None:
            where.append("origin=?")
            args.append(peer.key)
        if since_ms is not None:
            where.append("wall_ms>=?")
            args.append(since_ms)
        sql = "SELECT raw, path, old_path FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY wall_ms DESC, lamport DESC"
        for raw, path, old_path in self._db.execute(sql, args):
            if path_glob is not None and not (fnmatch.fnmatchcase(path, path_glob) or (
                    old_path and fnmatch.fnmatchcase(old_path, path_glob))):
                continue
            yield raw

    def query(self, peer: PeerId | None = None, since_ms: int | None = None,
              path_glob: str | None = None, limit: int = 100,
              include_relay_only: bool = False) -> list[ChangeEvent]:
        """Accepted events, oldest first (by wall time, then Lamport); newest `limit`."""
        limit = max(0, min(limit, QUERY_LIMIT_MAX))
        out: list[ChangeEvent] = []
        for raw in self._matching(peer, since_ms, path_glob, include_relay_only):
            out.append(ChangeEvent.decode(raw))
            if len(out) >= limit:
                break
        out.reverse()
        return out

    def query_page(self, peer: PeerId | None = None, since_ms: int | None = None,
                   path_glob: str | None = None, limit: int = 100,
                   include_relay_only: bool = False) -> tuple[list[ChangeEvent], int]:
        """``query`` plus how many events match in all (so a caller can say what it cut)."""
        limit = max(0, min(limit, QUERY_LIMIT_MAX))
        out: list[ChangeEvent] = []
        total = 0
        for raw in self._matching(peer, since_ms, path_glob, include_relay_only):
            total += 1
            if len(out) < limit:
                out.append(ChangeEvent.decode(raw))
        out.reverse()
        return out, total

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    # -- rejections ------------------------------------------------------------
    def record_rejected(self, origin: PeerId | None, seq: int | None,
                        event_id: bytes | None, reason: str) -> None:
        cur = self._db.execute(
            "INSERT INTO rejected (at_ms, origin, seq, event_id, reason) VALUES (?,?,?,?,?)",
            (now_ms(), origin.key if origin else None, seq, event_id, reason[:500]))
        rid = int(cur.lastrowid or 0)
        if rid % PRUNE_EVERY == 0:
            self._db.execute("DELETE FROM rejected WHERE id <= ?", (rid - REJECTED_KEEP,))

    def rejected(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT at_ms, origin, seq, event_id, reason FROM rejected ORDER BY id DESC LIMIT ?",
            (max(0, min(limit, QUERY_LIMIT_MAX)),)).fetchall()
        return [{"at_ms": r[0], "origin": str(PeerId(r[1])) if r[1] else None, "seq": r[2],
                 "event_id": r[3].hex() if r[3] else None, "reason": r[4]} for r in rows]

    # -- our own counters ------------------------------------------------------
    def _get_local(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM local WHERE key=?", (key,)).fetchone()
        return row[0] if row else 0

    def _set_local(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO local (key, value) VALUES (?,?) ON CONFLICT(key)"
                         " DO UPDATE SET value=excluded.value", (key, value))

    def _observe_lamport(self, lamport: int) -> None:
        if lamport > self._get_local("lamport"):
            self._set_local("lamport", lamport)

    @property
    def lamport(self) -> int:
        return self._get_local("lamport")

    def append_local(self, identity: Identity, *, kind: str, folder: str, path: str,
                     size: int, hash: bytes, old_path: str = "") -> ChangeEvent:
        """Sign our next event (next seq, Lamport+1) and store it, in one transaction."""
        own = identity.peer_id.key
        with self._tx():
            row = self._db.execute("SELECT highest FROM watermarks WHERE origin=?",
                                   (own,)).fetchone()
            seq = max(self._get_local("seq"), row[0] if row else 0) + 1
            lamport = min(self._get_local("lamport") + 1, MAX_SEQ)
            event = ChangeEvent.create(identity, folder=folder, seq=seq, lamport=lamport,
                                       kind=kind, path=path, size=size, hash=hash,
                                       old_path=old_path)
            self._set_local("seq", seq)
            self._set_local("lamport", lamport)
            self._db.execute(
                "INSERT INTO events (id, origin, seq, lamport, wall_ms, folder, kind, path,"
                " old_path, raw, relay_only, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?,0,?)",
                (event.id, own, seq, lamport, event.wall_ms, folder, kind, path, old_path,
                 event.encode(), event.wall_ms))
            self._advance_watermark(own, seq)
        self._events_total += 1
        return event

    def append_local_many(self, identity: Identity, folder: str,
                          changes: list[tuple[str, str, int, bytes, str]]) -> list[ChangeEvent]:
        """Sign and store our next events, one per (kind, path, size, hash, old_path),
        each with its own seq and Lamport time (each verifiable alone), in one transaction."""
        own = identity.peer_id.key
        events: list[ChangeEvent] = []
        with self._tx():
            row = self._db.execute("SELECT highest FROM watermarks WHERE origin=?",
                                   (own,)).fetchone()
            seq = max(self._get_local("seq"), row[0] if row else 0)
            lamport = self._get_local("lamport")
            for kind, path, size, hash, old_path in changes:
                seq += 1
                lamport = min(lamport + 1, MAX_SEQ)
                event = ChangeEvent.create(identity, folder=folder, seq=seq, lamport=lamport,
                                           kind=kind, path=path, size=size, hash=hash,
                                           old_path=old_path)
                self._db.execute(
                    "INSERT INTO events (id, origin, seq, lamport, wall_ms, folder, kind, path,"
                    " old_path, raw, relay_only, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?,0,?)",
                    (event.id, own, seq, lamport, event.wall_ms, folder, kind, path, old_path,
                     event.encode(), event.wall_ms))
                self._advance_watermark(own, seq)
                events.append(event)
            if events:
                self._set_local("seq", seq)
                self._set_local("lamport", lamport)
        self._events_total += len(events)
        return events

    # -- notifications ---------------------------------------------------------
    def emit(self, notice: Notice) -> int:
        """Store one typed notification (node/notifications.py); returns its id."""
        return self.notify(notice.KIND, notice.encode())

    def count_notifications(self, since_id: int = 0) -> int:
        """How many stored notifications have id > since_id."""
        return int(self._db.execute("SELECT COUNT(*) FROM notifications WHERE id>?",
                                    (since_id,)).fetchone()[0])

    def notify(self, kind: str, data: dict[str, Any]) -> int:
        """Append a notification; returns its id (previous id + 1)."""
        if kind not in NOTIFICATION_KINDS:
            raise ValueError(f"unknown notification kind {kind!r}")
        blob = packb(data)
        if len(blob) > MAX_NOTIFICATION_BYTES:
            raise ValueError("notification data too large")
        at = now_ms()
        cur = self._db.execute("INSERT INTO notifications (at_ms, kind, data) VALUES (?,?,?)",
                               (at, kind, blob))
        nid = int(cur.lastrowid or 0)
        self._last_notification_id = nid
        if nid % PRUNE_EVERY == 0:
            self._db.execute("DELETE FROM notifications WHERE id <= ?", (nid - NOTIFICATIONS_KEEP,))
        note = Notification(nid, at, kind, data)
        for cb in list(self._listeners):
            cb(note)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        return nid

    @property
    def last_notification_id(self) -> int:
        return self._last_notification_id

    def notifications(self, since_id: int = 0, limit: int = 1000) -> list[Notification]:
        """Notifications with id > since_id, oldest first."""
        rows = self._db.execute(
            "SELECT id, at_ms, kind, data FROM notifications WHERE id>? ORDER BY id LIMIT ?",
            (since_id, max(0, min(limit, NOTIFICATION_LIMIT_MAX)))).fetchall()
        out = []
        for nid, at, kind, blob in rows:
            try:
                data = unpackb(blob, max_bytes=MAX_NOTIFICATION_BYTES)
            except ProtocolError:
                data = {}
            out.append(Notification(nid, at, kind, data))
        return out

    def add_listener(self, callback: Callable[[Notification], None]) -> Callable[[], None]:
        """Call `callback` synchronously for each new notification; returns an unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    async def wait_for_notification(self, after_id: int, timeout: float | None = None,
                                    limit: int = 1000) -> list[Notification]:
        """Notifications with id > after_id; waits up to `timeout` s for one to appear."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._last_notification_id > after_id:
                return self.notifications(after_id, limit)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return []
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return []
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    # -- helpers ----------------------------------------------------------------
    def _tx(self) -> _Tx:
        return _Tx(self._db)

    def batch(self) -> _Batch:
        """``with log.batch():`` groups the adds and notifications of one gossip message
        (up to PUSH_BATCH_MAX events) into one commit instead of one per write."""
        return _Batch(self._db)


class _Tx:
    """One transaction; inside ``EventLog.batch()`` a savepoint, so a failed write still
    undoes only itself."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._nested = False

    def __enter__(self) -> None:
        self._nested = self._db.in_transaction
        self._db.execute("SAVEPOINT tx" if self._nested else "BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._nested:
            if exc_type:
                self._db.execute("ROLLBACK TO tx")
            self._db.execute("RELEASE tx")
        else:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")


class _Batch:
    """Many writes, one commit: each write inside is its own savepoint (see _Tx) and
    stands alone, so what was written is committed even when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self) -> None:
        self._outer = not self._db.in_transaction
        if self._outer:
            self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._outer:
            self._db.execute("COMMIT")


def ms_from_text(text: str) -> int:
    """Parse `--since` for `node log`: epoch ms, or a duration like 10m / 2h / 3d ago."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text and text[-1] in units and text[:-1].isdigit():
        return int((time.time() - int(text[:-1]) * units[text[-1]]) * 1000)
    if text.isdigit():
        return int(text)
    raise ConfigError(f"option --since: {text!r} is not a time (epoch ms, or e.g. 10m, 2h, 3d)")
