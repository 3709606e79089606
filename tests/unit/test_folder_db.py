"""node/folders/db.py: one transaction per ``tx()`` and decoded indexes kept in step."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.folders.db import FolderDB
from node.folders.model import FileInfo, FileKind
from node.folders.protocol import FolderChange
from node.folders.vector import Vector, device_key
from node.identity import Identity

HASH = b"\x01" * 32


def _info(name: str, counter: int = 1, dev: str = "") -> FileInfo:
    dev = dev or "a" * 16
    return FileInfo(name, FileKind.FILE, 5, 1_000, 0o644, HASH, False,
                    Vector().bump(dev, counter - 1), b"", dev)


def _rows(path: Path, table: str) -> int:
    other = sqlite3.connect(str(path))
    try:
        return int(other.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        other.close()


def test_tx_is_one_transaction_seen_by_others_only_at_its_end(tmp_path: Path) -> None:
    db = FolderDB(tmp_path / "f.db")
    try:
        with db.tx():
            for i in range(20):
                db.put_local(_info(f"f{i}"))
            db.set_meta("clock", 7)
            # autocommit (the old tx()) made each statement visible at once
            assert _rows(db.path, "local") == 0
            with db.tx():  # nested: joins the outer one
                db.put_local(_info("inner"))
            assert _rows(db.path, "local") == 0
        assert _rows(db.path, "local") == 21
    finally:
        db.close()


def test_a_failed_tx_stores_nothing_and_the_cached_index_agrees(tmp_path: Path) -> None:
    db = FolderDB(tmp_path / "f.db")
    try:
        db.put_local(_info("kept"))
        with pytest.raises(RuntimeError), db.tx():
            db.put_local(_info("lost"))
            db.drop_local("kept")
            raise RuntimeError("boom")
        assert set(db.local()) == {"kept"}
        assert _rows(db.path, "local") == 1
    finally:
        db.close()


def test_cached_indexes_match_a_fresh_open(tmp_path: Path) -> None:
    ident = Identity.generate("a")
    path = tmp_path / "f.db"
    db = FolderDB(path)
    me = device_key(ident.peer_id)
    try:
        db.put_local(_info("x", dev=me), changed=True)
        db.put_local(_info("y", dev=me))
        db.drop_local("y")
        change = FolderChange.create(ident, folder="docs", seq=3, wall_ms=1,
                                     info=_info("x", dev=me))
        assert db.put_remote(change)
        assert not db.put_remote(change)  # not newer: refused
        older = FolderChange.create(ident, folder="docs", seq=2, wall_ms=1,
                                    info=_info("x", 2, dev=me))
        assert not db.put_remote(older)
        local, changed, remotes = db.local(), db.changed_names(), db.remotes()
        local.clear()  # a copy: the cache is untouched
        assert set(db.local()) == {"x"}
    finally:
        db.close()
    again = FolderDB(path)
    try:
        assert set(again.local()) == {"x"} and again.changed_names() == changed == {"x"}
        assert again.remotes() == remotes
        assert again.remote_seq(ident.peer_id.key, "x") == 3
    finally:
        again.close()
