"""The node's own state: the state-name check, shared-root refusals, private files."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.logfmt import SafeFormatter, escape_for_log
from node.statefiles import (
    PrivateRotatingFileHandler,
    check_received_dir,
    check_shared_root,
    is_state_name,
    private_dir,
    private_file,
    write_private,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("name", [
    "identity.key", "identity.key.tmp", "trust.db", "trust.db-wal", "peers.db-shm",
    "events.db", "events.db-journal", "daemon.json", "daemon.lock", "node.log", "node.log.3",
    "quic-key.pem", "index-docs.db", "index-docs.db-wal", ".p2pfs-sync.p2pfs-index",
])
def test_state_names_are_recognised(name: str) -> None:
    assert is_state_name(name)


@pytest.mark.parametrize("name", [
    "notes.txt", "mytrust.db", "identity.keys", "node.log.txt", "index.db", "key", "events",
])
def test_ordinary_names_are_not_state(name: str) -> None:
    assert not is_state_name(name)


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    home = tmp_path / "user" / ".local" / "share" / "p2pfs"
    received = home / "received"
    for d in (home, received / "alice" / "docs", tmp_path / "user" / "photos"):
        d.mkdir(parents=True)
    return {"user": tmp_path / "user", "home": home, "received": received,
            "photos": tmp_path / "user" / "photos"}


@pytest.mark.parametrize("key,fragment", [
    ("user", "contains this node's home dir"),
    ("home", "contains this node's home dir"),
])
def test_folder_holding_the_home_is_refused(layout: dict[str, Path], key: str,
                                           fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        check_shared_root(layout[key], home=layout["home"], received=layout["received"])
    with pytest.raises(ConfigError, match=fragment):  # `node share` too
        check_shared_root(layout[key], home=layout["home"], received=layout["received"],
                          may_hold_received=True)


def test_folder_inside_the_home_is_refused_unless_inside_received(
        layout: dict[str, Path]) -> None:
    inner = layout["home"] / "logs"
    inner.mkdir()
    with pytest.raises(ConfigError, match="inside this node's home dir"):
        check_shared_root(inner, home=layout["home"], received=layout["received"])
    # received files are the user's, even under the default HOME/received
    check_shared_root(layout["received"] / "alice" / "docs", home=layout["home"],
                      received=layout["received"])
    check_shared_root(layout["photos"], home=layout["home"], received=layout["received"])


def test_folder_holding_the_received_dir_is_refused(tmp_path: Path) -> None:
    home, share = tmp_path / "home", tmp_path / "share"
    received = share / "inbox"
    received.mkdir(parents=True)
    home.mkdir()
    for folder in (share, received):
        with pytest.raises(ConfigError, match="contains this node's received dir"):
            check_shared_root(folder, home=home, received=received)
    # a one-off `node share` of it only pushes files: nothing echoes
    check_shared_root(share, home=home, received=received, may_hold_received=True)


def test_symlinked_spelling_of_the_home_is_still_refused(layout: dict[str, Path],
                                                        tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(layout["user"])
    with pytest.raises(ConfigError, match="home dir"):
        check_shared_root(link, home=layout["home"], received=layout["received"])


def test_received_dir_holding_the_home_is_refused(layout: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="received dir"):
        check_received_dir(layout["user"], home=layout["home"])
    check_received_dir(layout["received"], home=layout["home"])


def test_private_dir_is_0700_and_tightens(tmp_path: Path) -> None:
    fresh = private_dir(tmp_path / "a" / "home")
    assert mode(fresh) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    assert mode(private_dir(old)) == 0o700


def test_private_file_creates_and_tightens_db_side_files(tmp_path: Path) -> None:
    db = tmp_path / "trust.db"
    private_file(db)
    assert mode(db) == 0o600
    db.chmod(0o644)
    wal = tmp_path / "trust.db-wal"
    wal.write_bytes(b"")
    wal.chmod(0o644)
    private_file(db)
    assert mode(db) == 0o600 and mode(wal) == 0o600
    assert private_file(":memory:") == ":memory:"


def test_sqlite_side_files_inherit_the_private_mode(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "events.db"
    conn = sqlite3.connect(str(private_file(db)), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        made = sorted(p.name for p in tmp_path.iterdir())
        assert "events.db-wal" in made and "events.db-shm" in made
        assert {p.name: mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(made, 0o600)
    finally:
        conn.close()


def test_write_private_is_atomic_and_0600(tmp_path: Path) -> None:
    target = tmp_path / "daemon.json"
    write_private(target, b"{}")
    write_private(target, b'{"pid": 1}')
    assert target.read_bytes() == b'{"pid": 1}' and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]


def test_log_file_and_rotations_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    handler = PrivateRotatingFileHandler(path, maxBytes=200, backupCount=2)
    logger = logging.getLogger("test.statefiles.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(20):
            logger.warning("line %d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log", "node.log.1", "node.log.2"]
    assert {mode(tmp_path / f) for f in files} == {0o600}


def test_a_file_name_cannot_forge_a_log_line() -> None:
    fmt = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    name = "bad\nINFO p2pfs.daemon: node is up\r\x1b[2J\udcff.txt"
    record = logging.LogRecord("p2pfs.watcher", logging.WARNING, __file__, 1,
                               "not announcing %s", (name,), None)
    line = fmt.format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line == ("WARNING p2pfs.watcher: not announcing "
                    "bad\\nINFO p2pfs.daemon: node is up\\r\\x1b[2J\\udcff.txt")
    line.encode("utf-8")  # a lone surrogate would make the file handler fail
    assert escape_for_log("plain name.txt") == "plain name.txt"


def test_a_traceback_keeps_its_lines() -> None:
    fmt = SafeFormatter("%(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "a\nb", None,
                                   sys.exc_info())
    text = fmt.format(record)
    assert text.startswith("a\\nb\nTraceback")


def test_private_file_never_opens_an_existing_file(tmp_path: Path, monkeypatch) -> None:
    """Closing any fd of a database file drops this process's POSIX locks on it, so an
    existing file (maybe a database open in this process) is only chmod-ed, never opened."""
    import os as os_mod

    from node import statefiles

    db = tmp_path / "trust.db"
    db.write_bytes(b"x")
    db.chmod(0o644)
    opened: list[str] = []
    real_open = os_mod.open

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(statefiles.os, "open", spy)
    statefiles.private_file(db)
    assert str(db) not in opened
    assert db.stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "new.db"
    statefiles.private_file(fresh)  # a missing file is created, 0600
    assert fresh.stat().st_mode & 0o777 == 0o600
    link = tmp_path / "link.db"
    link.symlink_to(db)
    with pytest.raises(OSError):
        statefiles.private_file(link)
