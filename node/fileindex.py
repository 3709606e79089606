"""The file index and content hashing both the watcher and shared folders use.

``FileIndex`` (SQLite: path -> size, mtime_ns, BLAKE3) remembers what a watched
folder held when it was last looked at; ``hash_file`` hashes a regular file
without following a symlink or blocking on a FIFO. Moved out of node/watcher.py
so node/folders (the two-way folders and the --share mirror) import them without
depending on the watcher.

Imports node.errors and node.statefiles only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from node.errors import LocalIOError
from node.statefiles import private_file

HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class IndexEntry:
    path: str
    size: int
    mtime_ns: int
    hash: bytes


def hash_file(path: Path) -> tuple[int, int, bytes]:
    """(size, mtime_ns, BLAKE3-256) of a regular file; blocking, run it in a thread.

    Never follows a symlink at `path` (OSError ELOOP) and never opens anything but
    a regular file (no FIFO to block on, no device): a link to /etc/passwd is not
    hashed as if it were the file.
    """
    h = blake3.blake3()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return st.st_size, st.st_mtime_ns, h.digest()


class FileIndex:
    """path -> (size, mtime_ns, hash), in SQLite; one per watched folder."""

    def __init__(self, path: Path | str) -> None:
        try:
            self._db = sqlite3.connect(str(private_file(path)), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # an index is a cache of the folder (a rescan rebuilds it): no fsync per commit
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                " mtime_ns INTEGER NOT NULL, hash BLOB NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS files_hash ON files (hash)")
        except (sqlite3.Error, OSError) as exc:
            # the path is said once: an OSError's own text would repeat it
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LocalIOError(f"cannot open file index {path}: {why}") from None
        self._tx_depth = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one commit (re-entrant; each write stands on its own, so
        what was written is committed even when the block raises)."""
        self.begin_batch()
        try:
            yield
        finally:
            self.end_batch()

    def begin_batch(self) -> None:
        if self._tx_depth == 0:
            self._db.execute("BEGIN")
        self._tx_depth += 1

    def end_batch(self) -> None:
        self._tx_depth -= 1
        if self._tx_depth == 0:
            self._db.execute("COMMIT")

    def get(self, path: str) -> IndexEntry | None:
        row = self._db.execute("SELECT path, size, mtime_ns, hash FROM files WHERE path=?",
                               (path,)).fetchone()
        return IndexEntry(*row) if row else None

    def put(self, path: str, size: int, mtime_ns: int, hash: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?)",
                         (path, size, mtime_ns, hash))

    def remove(self, path: str) -> None:
        self._db.execute("DELETE FROM files WHERE path=?", (path,))

    def find_by_hash(self, hash: bytes) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT path FROM files WHERE hash=?", (hash,))]

    def totals(self) -> tuple[int, int]:
        """(number of files, their bytes), without loading the index."""
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files"
                                       ).fetchone()
        return int(count), int(size)

    def all(self) -> dict[str, IndexEntry]:
        return {r[0]: IndexEntry(*r) for r in
                self._db.execute("SELECT path, size, mtime_ns, hash FROM files")}

    def close(self) -> None:
        self._db.close()
