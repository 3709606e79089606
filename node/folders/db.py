"""One folder's state in SQLite (``folder-<id>.db`` in the home, 0600).

* ``local``: our index, name -> FileInfo (what is on our disk as we last saw
  it), with a ``changed`` mark for receive-only local edits;
* ``remote``: every origin's newest signed change per name (its index), the
  change's encoding kept so it can be relayed to other devices of the folder;
* ``marks``: per origin, the seq up to which we hold every change it made;
* ``meta``: our change counter (``seq``) and version clock (``clock``).

A fetch that failed is not stored as such: the remote index still says a
version we lack, so the next plan (also after a restart) fetches it again.

Imports sqlite3, the folder model/protocol and statefiles.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from node.errors import LocalIOError
from node.folders.model import FileInfo
from node.folders.protocol import FolderChange
from node.statefiles import private_file
from node.wire import packb, unpackb

SCHEMA = """
CREATE TABLE IF NOT EXISTS local (name TEXT PRIMARY KEY, info BLOB NOT NULL,
                                  changed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS remote (origin BLOB NOT NULL, name TEXT NOT NULL,
                                   seq INTEGER NOT NULL, change BLOB NOT NULL,
                                   PRIMARY KEY (origin, name));
CREATE INDEX IF NOT EXISTS remote_seq ON remote (origin, seq);
CREATE TABLE IF NOT EXISTS marks (origin BLOB PRIMARY KEY, mark INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def _info(blob: bytes) -> FileInfo:
    return FileInfo.from_wire(unpackb(blob))


class FolderDB:
    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(str(private_file(path)), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LocalIOError(f"cannot open folder database {path}: {exc}") from None
        self.path = path

    def close(self) -> None:
        self._db.close()

    def tx(self) -> sqlite3.Connection:
        """``with db.tx():`` one transaction."""
        return self._db

    # -- meta ---------------------------------------------------------------------
    def meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    # -- local index ------------------------------------------------------------------
    def local(self) -> dict[str, FileInfo]:
        return {name: _info(blob) for name, blob in
                self._db.execute("SELECT name, info FROM local")}

    def changed_names(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT name FROM local WHERE changed=1")}

    def put_local(self, info: FileInfo, changed: bool = False) -> None:
        self._db.execute("INSERT OR REPLACE INTO local VALUES (?,?,?)",
                         (info.name, packb(info.to_wire()), int(changed)))

    def clear_local(self) -> None:
        self._db.execute("DELETE FROM local")

    def drop_local(self, name: str) -> None:
        self._db.execute("DELETE FROM local WHERE name=?", (name,))

    # -- remote indexes -------------------------------------------------------------------
    def remote_seq(self, origin: bytes, name: str) -> int:
        row = self._db.execute("SELECT seq FROM remote WHERE origin=? AND name=?",
                               (origin, name)).fetchone()
        return int(row[0]) if row else 0

    def put_remote(self, change: FolderChange) -> bool:
        """Store a verified change if it is newer than what we hold for its name."""
        key = change.origin.key
        if self.remote_seq(key, change.info.name) >= change.seq:
            return False
        self._db.execute("INSERT OR REPLACE INTO remote VALUES (?,?,?,?)",
                         (key, change.info.name, change.seq, change.encoded))
        return True

    def remotes(self) -> dict[bytes, dict[str, FileInfo]]:
        out: dict[bytes, dict[str, FileInfo]] = {}
        for origin, blob in self._db.execute("SELECT origin, change FROM remote"):
            change = FolderChange.decode(blob)
            out.setdefault(bytes(origin), {})[change.info.name] = change.info
        return out

    def changes_since(self, origin: bytes, since: int, limit: int) -> list[bytes]:
        return [bytes(r[0]) for r in self._db.execute(
            "SELECT change FROM remote WHERE origin=? AND seq>? ORDER BY seq LIMIT ?",
            (origin, since, limit))]

    def seq_of(self, blob: bytes) -> int:
        return FolderChange.decode(blob).seq

    def origins(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._db.execute("SELECT DISTINCT origin FROM remote")]

    # -- marks ----------------------------------------------------------------------------
    def marks(self) -> dict[bytes, int]:
        return {bytes(k): int(v) for k, v in self._db.execute("SELECT origin, mark FROM marks")}

    def mark(self, origin: bytes) -> int:
        row = self._db.execute("SELECT mark FROM marks WHERE origin=?", (origin,)).fetchone()
        return int(row[0]) if row else 0

    def set_mark(self, origin: bytes, mark: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO marks VALUES (?,?)", (origin, mark))

    def iter_local_names(self) -> Iterator[str]:
        for (name,) in self._db.execute("SELECT name FROM local"):
            yield name
