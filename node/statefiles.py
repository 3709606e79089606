"""The node's own state: private files and dirs, and the one "is this node state" check.

Everything the node writes into its home dir (key, databases, logs,
``daemon.json``) is created through ``private_file`` / ``write_private``
(mode 0600) inside a dir made by ``private_dir`` (mode 0700). SQLite creates
its ``-wal``/``-shm``/``-journal`` files with the mode of the database file,
so a database opened on a path ``private_file`` prepared stays private.

The node never publishes its own state: ``is_state_name`` names the files a
node keeps (wherever they are, so a copy of someone's home is not published
either), and ``check_shared_root`` refuses a shared folder that contains the
home dir or lies inside it, or that contains the node's received dir (pushed
files would be announced again as our own changes).

Imports nothing of the project except errors.
"""

from __future__ import annotations

import errno
import io
import logging.handlers
import os
import re
import stat
import tempfile
from pathlib import Path

from node.errors import ConfigError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# the node's own files, by name (see node/identity.py, trust.py, daemon.py, ...)
STATE_FILE_NAMES = frozenset({
    "identity.key", "trust.db", "peers.db", "events.db", "daemon.json", "daemon.lock",
    "node.log", "control.sock", "quic-key.pem", "quic-cert.pem", "gui.token",
})
# file indexes (watcher, sync) end so, wherever they are
INDEX_SUFFIX = ".p2pfs-index"
SQLITE_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
# rotated logs, per-folder indexes, temp files of atomic writes, SQLite side files
_STATE_NAME_RE = re.compile(
    r"^(?:node\.log\.\d+|index-[^/]+\.db|(?:identity\.key|daemon\.json)\.tmp"
    r"|\.gui\.token\.[^/]*\.tmp)"
    r"(?:-wal|-shm|-journal)?$")


def is_state_name(name: str) -> bool:
    """True for the name of a file a p2pfs node keeps in its home: never published."""
    base = name
    for suffix in SQLITE_SIDE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return (base in STATE_FILE_NAMES or base.endswith(INDEX_SUFFIX)
            or bool(_STATE_NAME_RE.match(name)))


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_received_dir(received: Path, *, home: Path) -> None:
    """ConfigError when the received dir would hold the home dir (or be it)."""
    received, home = Path(received).resolve(), Path(home).resolve()
    if _is_within(home, received):
        raise ConfigError(f"received dir {received} contains this node's home dir {home}; "
                          "pick a received dir that does not hold the node's keys and databases")


def check_shared_root(folder: Path, *, home: Path, received: Path,
                      what: str = "shared folder", may_hold_received: bool = False) -> None:
    """ConfigError when publishing `folder` would publish the node's own state.

    Refused: a folder that contains the home dir, and one inside it, except inside
    the received dir (received files are the user's, even under the default
    HOME/received); unless `may_hold_received`, also a folder that contains the
    received dir. All paths are resolved here.
    """
    folder, home = Path(folder).resolve(), Path(home).resolve()
    received = Path(received).resolve()
    if _is_within(home, folder):
        raise ConfigError(f"{what} {folder} contains this node's home dir {home}; "
                          "share a folder that does not hold the node's keys and databases")
    if _is_within(folder, home) and not (received != home and _is_within(folder, received)):
        raise ConfigError(f"{what} {folder} is inside this node's home dir {home}; "
                          "share a folder outside it")
    if not may_hold_received:
        if _is_within(received, folder):
            raise ConfigError(f"{what} {folder} contains this node's received dir {received}; "
                              "received files would be announced again as this node's own. "
                              "Use --received-dir outside it, or share a sub-folder")


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with the leaf at mode 0700; tighten it if it is wider."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & PRIVATE_DIR_MODE)
    return path


def private_file(path: Path | str) -> Path | str:
    """Make sure `path` exists with mode 0600 (created empty, or tightened), and so do
    SQLite side files next to it; returns `path`. ``:memory:`` passes through."""
    if str(path) in ("", ":memory:"):
        return path
    p = Path(path)
    # An existing file is never opened here: closing any fd of a database file drops
    # this process's POSIX locks on it, which would break a connection already open.
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    if st is None:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
        try:
            _tighten_fd(fd)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "refusing a symlink as a private file", str(p))
    elif stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, PRIVATE_FILE_MODE)
    for suffix in SQLITE_SIDE_SUFFIXES:
        side = p.with_name(p.name + suffix)
        try:
            st = os.lstat(side)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(side, PRIVATE_FILE_MODE)
    return path


def _tighten_fd(fd: int) -> None:
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, PRIVATE_FILE_MODE)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600 before the first byte is written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files (and every rotated one) are mode 0600."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                     | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
        _tighten_fd(fd)
        return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)
