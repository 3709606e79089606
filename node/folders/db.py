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

import contextlib
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
            # WAL + NORMAL: a commit is not fsynced (the WAL is, at checkpoints); a power
            # cut may lose the last commits, which the next scan and anti-entropy redo
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LocalIOError(f"cannot open folder database {path}: {exc}") from None
        self.path = path
        # decoded indexes, loaded once and kept in step with every write (a round plans
        # from them: decoding every signed change each round was most of a sync's CPU)
        self._local: dict[str, FileInfo] | None = None
        self._changed: set[str] | None = None
        self._remote: dict[bytes, dict[str, tuple[int, FileInfo]]] | None = None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """``with db.tx():`` one transaction (one commit for everything inside it).

        The connection is in autocommit mode (isolation_level=None), where sqlite3's own
        ``with connection:`` begins nothing: every statement was its own commit. Nested
        uses join the outer transaction. Never hold it across an ``await``: another task's
        statements would join it (and be rolled back with it)."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._local = self._changed = self._remote = None  # reloaded from the disk
            raise
        self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------
    def meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    # -- local index ------------------------------------------------------------------
    def _load_local(self) -> tuple[dict[str, FileInfo], set[str]]:
        if self._local is None or self._changed is None:
            local: dict[str, FileInfo] = {}
            changed: set[str] = set()
            for name, blob, flag in self._db.execute("SELECT name, info, changed FROM local"):
                local[name] = _info(blob)
                if flag:
                    changed.add(name)
            self._local, self._changed = local, changed
        return self._local, self._changed

    def local(self) -> dict[str, FileInfo]:
        """Our index (a copy: the caller may change it)."""
        return dict(self._load_local()[0])

    def local_info(self, name: str) -> FileInfo | None:
        return self._load_local()[0].get(name)

    def changed_names(self) -> set[str]:
        return set(self._load_local()[1])

    def is_changed(self, name: str) -> bool:
        return name in self._load_local()[1]

    def put_local(self, info: FileInfo, changed: bool = False) -> None:
        local, marked = self._load_local()
        self._db.execute("INSERT OR REPLACE INTO local VALUES (?,?,?)",
                         (info.name, packb(info.to_wire()), int(changed)))
        local[info.name] = info
        if changed:
            marked.add(info.name)
        else:
            marked.discard(info.name)

    def clear_local(self) -> None:
        self._db.execute("DELETE FROM local")
        self._local, self._changed = {}, set()

    def drop_local(self, name: str) -> None:
        local, marked = self._load_local()
        self._db.execute("DELETE FROM local WHERE name=?", (name,))
        local.pop(name, None)
        marked.discard(name)

    # -- remote indexes -------------------------------------------------------------------
    def _load_remote(self) -> dict[bytes, dict[str, tuple[int, FileInfo]]]:
        if self._remote is None:
            out: dict[bytes, dict[str, tuple[int, FileInfo]]] = {}
            for origin, blob in self._db.execute("SELECT origin, change FROM remote"):
                change = FolderChange.decode(blob)
                out.setdefault(bytes(origin), {})[change.info.name] = (change.seq,
                                                                       change.info)
            self._remote = out
        return self._remote

    def remote_seq(self, origin: bytes, name: str) -> int:
        got = self._load_remote().get(origin, {}).get(name)
        return got[0] if got is not None else 0

    def put_remote(self, change: FolderChange) -> bool:
        """Store a verified change if it is newer than what we hold for its name."""
        key = change.origin.key
        if self.remote_seq(key, change.info.name) >= change.seq:
            return False
        self._db.execute("INSERT OR REPLACE INTO remote VALUES (?,?,?,?)",
                         (key, change.info.name, change.seq, change.encoded))
        self._load_remote().setdefault(key, {})[change.info.name] = (change.seq, change.info)
        return True

    def remote_count(self, origin: bytes) -> int:
        """How many names `origin`'s index holds (deletions included)."""
        return len(self._load_remote().get(origin, {}))

    def remotes(self) -> dict[bytes, dict[str, FileInfo]]:
        """Every origin's index (copies: the caller may change them)."""
        return {origin: {name: info for name, (_seq, info) in index.items()}
                for origin, index in self._load_remote().items()}

    def remote_index(self, origin: bytes) -> dict[str, FileInfo]:
        return {name: info for name, (_seq, info) in self._load_remote().get(origin, {}).items()}

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
