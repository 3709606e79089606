"""The event log: every accepted change event, our own counters, and notifications.

One SQLite file (stdlib sqlite3, WAL) per node, used from the event-loop thread
only (each call is a short local transaction). Tables:

* ``events``: signed events by id, unique on (origin, seq). ``relay_only`` marks
  events from origins we do not trust: they are kept so we can pass them on
  (anti-entropy) but never shown by ``query`` or acted upon.
* ``watermarks``: per origin, the highest seq n such that 1..n are all present
  (the "contiguous highest"). Anti-entropy digests carry these, so a gap left
  by a lost push is pulled again.
* ``rejected``: events refused (bad signature, reused seq, oversize...), for audit.
* ``local``: our own next seq and Lamport clock, persisted.
* ``notifications``: what `node events` streams; ids go up by exactly one
  (AUTOINCREMENT, never rolled back without the row), so a client that
  reconnects with ``since=N`` can tell whether it missed something.

Imports node.gossip.events, node.identity, node.wire and node.errors only; it
must not import the engine, the service or any transport.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ConfigError, LocalIOError, ProtocolError
from node.gossip.events import MAX_SEQ, ChangeEvent, now_ms
from node.identity import Identity, PeerId
from node.statefiles import private_file
from node.wire import packb, unpackb

MISSING_BATCH_MAX = 256
QUERY_LIMIT_MAX = 10_000
NOTIFICATION_LIMIT_MAX = 10_000
NOTIFICATION_KINDS = (
    "file_shared", "file_updated", "file_deleted", "file_moved", "file_received",
    "transfer_failed", "peer_joined", "peer_left", "event_rejected",
)
MAX_NOTIFICATION_BYTES = 8192
# bounded audit/notification tables: old rows are pruned, ids keep counting up
NOTIFICATIONS_KEEP = 100_000
REJECTED_KEEP = 10_000
PRUNE_EVERY = 1000
# events we only relay (untrusted origin) are capped per origin, so a stranger
# with a valid key cannot fill our disk
RELAY_ONLY_MAX_PER_ORIGIN = 10_000

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
    QUOTA = "quota"  # an untrusted origin already fills its relay-only quota


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

    def close(self) -> None:
        self._db.close()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    # -- events --------------------------------------------------------------
    def add(self, event: ChangeEvent, *, relay_only: bool = False) -> AddOutcome:
        """Store a verified event. A reused (origin, seq) is refused and recorded."""
        db = self._db
        if db.execute("SELECT 1 FROM events WHERE id=?", (event.id,)).fetchone():
            return AddOutcome.DUPLICATE
        row = db.execute("SELECT id FROM events WHERE origin=? AND seq=?",
                         (event.origin.key, event.seq)).fetchone()
        if row is not None:
            self.record_rejected(event.origin, event.seq, event.id,
                                 "sequence number reused with different content")
            return AddOutcome.CONFLICT
        if relay_only and db.execute(
                "SELECT COUNT(*) FROM events WHERE origin=?", (event.origin.key,)
        ).fetchone()[0] >= RELAY_ONLY_MAX_PER_ORIGIN:
            self.record_rejected(event.origin, event.seq, event.id,
                                 "relay quota for an untrusted origin exhausted")
            return AddOutcome.QUOTA
        with self._tx():
            db.execute(
                "INSERT INTO events (id, origin, seq, lamport, wall_ms, folder, kind, path,"
                " old_path, raw, relay_only, received_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (event.id, event.origin.key, event.seq, event.lamport, event.wall_ms,
                 event.folder, event.kind, event.path, event.old_path, event.encode(),
                 int(relay_only), now_ms()))
            self._advance_watermark(event.origin.key, event.seq)
            if not relay_only:  # an untrusted origin must not be able to push our clock around
                self._observe_lamport(event.lamport)
        return AddOutcome.NEW

    def has(self, event_id: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM events WHERE id=?", (event_id,)).fetchone() \
            is not None

    def get(self, event_id: bytes) -> ChangeEvent | None:
        row = self._db.execute("SELECT raw FROM events WHERE id=?", (event_id,)).fetchone()
        return ChangeEvent.decode(row[0]) if row else None

    def _advance_watermark(self, origin: bytes, seq: int) -> None:
        row = self._db.execute("SELECT contiguous, highest FROM watermarks WHERE origin=?",
                               (origin,)).fetchone()
        contiguous, highest = row if row else (0, 0)
        highest = max(highest, seq)
        if seq == contiguous + 1:
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

    def missing_for(self, their_highest: dict[bytes, int],
                    limit: int = MISSING_BATCH_MAX) -> list[ChangeEvent]:
        """Events the other side lacks (seq above its contiguous highest), oldest first."""
        limit = max(0, min(limit, MISSING_BATCH_MAX))
        out: list[ChangeEvent] = []
        for origin, highest in self._db.execute(
                "SELECT origin, highest FROM watermarks ORDER BY origin").fetchall():
            if len(out) >= limit:
                break
            theirs = their_highest.get(origin, 0)
            if highest <= theirs:
                continue
            rows = self._db.execute(
                "SELECT raw FROM events WHERE origin=? AND seq>? ORDER BY seq LIMIT ?",
                (origin, theirs, limit - len(out))).fetchall()
            out.extend(ChangeEvent.decode(r[0]) for r in rows)
        return out

    def query(self, peer: PeerId | None = None, since_ms: int | None = None,
              path_glob: str | None = None, limit: int = 100,
              include_relay_only: bool = False) -> list[ChangeEvent]:
        """Accepted events, oldest first (by wall time, then Lamport); newest `limit`."""
        limit = max(0, min(limit, QUERY_LIMIT_MAX))
        where: list[str] = []
        args: list[Any] = []
        if not include_relay_only:
            where.append("relay_only=0")
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
        out: list[ChangeEvent] = []
        for raw, path, old_path in self._db.execute(sql, args):
            if path_glob is not None and not (fnmatch.fnmatchcase(path, path_glob) or (
                    old_path and fnmatch.fnmatchcase(old_path, path_glob))):
                continue
            out.append(ChangeEvent.decode(raw))
            if len(out) >= limit:
                break
        out.reverse()
        return out

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
        return event

    # -- notifications ---------------------------------------------------------
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


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def ms_from_text(text: str) -> int:
    """Parse `--since` for `node log`: epoch ms, or a duration like 10m / 2h / 3d ago."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text and text[-1] in units and text[:-1].isdigit():
        return int((time.time() - int(text[:-1]) * units[text[-1]]) * 1000)
    if text.isdigit():
        return int(text)
    raise ConfigError(f"option --since: {text!r} is not a time (epoch ms, or e.g. 10m, 2h, 3d)")
