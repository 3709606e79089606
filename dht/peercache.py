"""PeerCache: every verified contact record this node has seen, in SQLite (WAL).

A restarted node rejoins the DHT from ``dht_addresses()`` when no bootstrap
server answers. Records are stored as their msgpack encoding (never a
serialised Python object) and re-verified on load: a row whose signature does
not check out is deleted, not returned. Per peer only the highest ``seq`` is
kept. ``get()`` returns only current records; ``records()`` and
``dht_addresses()`` also return expired ones (an old address is still the best
guess for rejoining after a long time offline).

Stdlib sqlite3 only; imports dht.records, node.contact, node.identity, node.errors.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from dht.records import check_signature
from node.contact import ContactRecord
from node.errors import LocalIOError, ProtocolError
from node.identity import PeerId
from node.statefiles import private_file

log = logging.getLogger(__name__)

SOURCES = ("bootstrap", "dht", "cache", "manual", "gossip", "lan")
MAX_CACHED_PEERS = 10_000
DEFAULT_DHT_ADDRESSES = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    peer_key  BLOB PRIMARY KEY,
    record    BLOB NOT NULL,
    seq       INTEGER NOT NULL,
    source    TEXT NOT NULL,
    last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS peers_last_seen ON peers(last_seen);
"""


class PeerCache:
    def __init__(self, path: Path, *, max_peers: int = MAX_CACHED_PEERS) -> None:
        self.path = path
        self.max_peers = max_peers
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(private_file(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LocalIOError(f"cannot open the peer cache {path}: {exc}") from None

    def add(self, record: ContactRecord, source: str, *, now: float | None = None) -> bool:
        """Keep a verified record; False when a higher seq is already cached.

        Raises ProtocolError for a record that fails verification (signature, expiry)
        and ValueError for an unknown `source`.
        """
        if source not in SOURCES:
            raise ValueError(f"peer cache source must be one of {SOURCES}, not {source!r}")
        now_f = time.time() if now is None else now
        record.verify(now_f)
        key = record.peer_id.key
        try:
            row = self._db.execute("SELECT seq FROM peers WHERE peer_key = ?", (key,)).fetchone()
            if row is not None and row[0] > record.seq:
                return False
            if row is not None and row[0] == record.seq:
                self._db.execute("UPDATE peers SET last_seen = ?, source = ? WHERE peer_key = ?",
                                 (now_f, source, key))
                return True
            self._db.execute(
                "INSERT OR REPLACE INTO peers (peer_key, record, seq, source, last_seen) "
                "VALUES (?, ?, ?, ?, ?)", (key, record.encode(), record.seq, source, now_f))
            if row is None:
                self._trim()
        except sqlite3.Error as exc:
            raise LocalIOError(f"peer cache {self.path}: {exc}") from None
        return True

    def _trim(self) -> None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM peers").fetchone()
        if count > self.max_peers:
            self._db.execute(
                "DELETE FROM peers WHERE peer_key IN "
                "(SELECT peer_key FROM peers ORDER BY last_seen ASC LIMIT ?)",
                (count - self.max_peers,))

    def _load(self, key: bytes, blob: bytes) -> ContactRecord | None:
        try:
            record = ContactRecord.decode(blob)
            if record.peer_id.key != key:
                raise ProtocolError("cached record is filed under another peer")
            check_signature(record)
        except ProtocolError as exc:
            log.warning("dropping an invalid peer cache row: %s", exc)
            self._db.execute("DELETE FROM peers WHERE peer_key = ?", (key,))
            return None
        return record

    def get(self, peer_id: PeerId) -> ContactRecord | None:
        """The cached, verified, unexpired record of `peer_id`, or None."""
        row = self._db.execute("SELECT peer_key, record FROM peers WHERE peer_key = ?",
                               (peer_id.key,)).fetchone()
        if row is None:
            return None
        record = self._load(row[0], row[1])
        return record if record is not None and not record.is_expired() else None

    def records(self) -> list[tuple[ContactRecord, str, float]]:
        """Every verified cached record (also expired ones) with its source and last_seen."""
        out = []
        rows = self._db.execute(
            "SELECT peer_key, record, source, last_seen FROM peers ORDER BY last_seen DESC"
        ).fetchall()
        for key, blob, source, last_seen in rows:
            record = self._load(key, blob)
            if record is not None:
                out.append((record, str(source), float(last_seen)))
        return out

    def dht_addresses(self, limit: int = DEFAULT_DHT_ADDRESSES) -> list[tuple[str, int]]:
        """(host, dht port) of cached peers, most recently seen first."""
        out: list[tuple[str, int]] = []
        cursor = self._db.execute(
            "SELECT peer_key, record FROM peers ORDER BY last_seen DESC")
        for key, blob in cursor.fetchall():
            if len(out) >= limit:
                break
            record = self._load(key, blob)
            endpoint = record.endpoint("dht") if record is not None else None
            if endpoint is not None and endpoint not in out:
                out.append(endpoint)
        return out

    def __len__(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM peers").fetchone()
        return int(count)

    def close(self) -> None:
        self._db.close()
