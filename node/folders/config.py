"""Folder configuration: which folders this node syncs, where, with whom, how.

A folder is named by an id every device agrees on (``--id photos``), lives at
a path of its own on each device, and is shared only with the peers listed
for it. Both sides must list each other for the same id before anything
flows (as in Syncthing); an offer for an id we do not have becomes a
``folder_offered`` notification, never a silent sync.

The configuration is one JSON file in the home (``folders.json``, 0600,
replaced atomically). ``FolderStore`` is the only code that reads or writes
it; the CLI edits it through the daemon's control socket when a daemon runs
(so the change takes effect at once) and directly when none does. A running
daemon also notices edits by ``mtime`` (``changed()``).

Pure data and file I/O only: imports errors, identity and statefiles, nothing above.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from node.errors import P2PError
from node.identity import PeerId
from node.statefiles import write_private

FOLDERS_FILE_NAME = "folders.json"
FOLDERS_FILE_VERSION = 1
MAX_FOLDERS = 256
MAX_FOLDER_PEERS = 64
MAX_FOLDER_ID_LEN = 64
MAX_LABEL_LEN = 128
FOLDER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_RESCAN_INTERVAL_S = 3600.0
DEFAULT_VERSIONS_KEEP_DAYS = 30.0
DEFAULT_VERSIONS_KEEP_COUNT = 5
# the most a hand-edited folders.json may say (beyond: a typo, refused)
MAX_RESCAN_INTERVAL_S = 365 * 86400.0
MAX_VERSIONS_KEEP_DAYS = 36500.0
MAX_VERSIONS_KEEP_COUNT = 100_000


class FolderMode(enum.Enum):
    SEND_RECEIVE = "send-receive"
    SEND_ONLY = "send-only"
    RECEIVE_ONLY = "receive-only"


MODES_TEXT = ", ".join(m.value for m in FolderMode)
# a folder status made from the configuration alone (no engine): counts unknown
STATUS_SOURCE_CONFIG = "config"


class FolderConfigError(ValueError):
    """A folder setting that cannot be accepted; the message says which and why."""


def check_folder_id(folder_id: str) -> str:
    if not FOLDER_ID_RE.match(folder_id or ""):
        raise FolderConfigError(
            f"folder id {folder_id!r} is not valid: use 1-{MAX_FOLDER_ID_LEN} letters, digits, "
            "'.', '_' or '-', starting with a letter or digit")
    return folder_id


@dataclass(frozen=True, slots=True)
class FolderConfig:
    id: str
    path: Path  # absolute, symlink-resolved
    peers: tuple[PeerId, ...] = ()
    mode: FolderMode = FolderMode.SEND_RECEIVE
    label: str = ""
    paused: bool = False
    rescan_interval_s: float = DEFAULT_RESCAN_INTERVAL_S
    versions_keep_days: float = DEFAULT_VERSIONS_KEEP_DAYS
    versions_keep_count: int = DEFAULT_VERSIONS_KEEP_COUNT

    def shared_with(self, peer: PeerId) -> bool:
        return peer in self.peers

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "path": str(self.path), "peers": [str(p) for p in self.peers],
            "mode": self.mode.value, "label": self.label, "paused": self.paused,
            "rescan_interval_s": self.rescan_interval_s,
            "versions_keep_days": self.versions_keep_days,
            "versions_keep_count": self.versions_keep_count,
        }

    @classmethod
    def from_json(cls, d: Any) -> FolderConfig:
        """One entry of folders.json, which a person may have edited by hand: every field
        of the right type (no "paused": "false" read as true, no NaN interval, no NUL in a
        path), or FolderConfigError naming the entry and the field."""
        if not isinstance(d, dict):
            raise FolderConfigError(f"a folder entry must be an object, not {_kind(d)}")
        fid = d.get("id")
        name = repr(fid) if isinstance(fid, str) else "?"
        try:
            if not isinstance(fid, str):
                raise ValueError("'id' must be text")
            path = d.get("path")
            if not isinstance(path, str) or not path or "\x00" in path:
                raise ValueError("'path' must be a path as text")
            peers_raw = d.get("peers", [])
            if not isinstance(peers_raw, list) or not all(isinstance(p, str) for p in peers_raw):
                raise ValueError("'peers' must be a list of peer ids")
            peers = tuple(PeerId.parse(p) for p in peers_raw)
            mode, label = d.get("mode", FolderMode.SEND_RECEIVE.value), d.get("label", "")
            if not isinstance(mode, str) or not isinstance(label, str):
                raise ValueError("'mode' and 'label' must be text")
            paused = d.get("paused", False)
            if not isinstance(paused, bool):
                raise ValueError("'paused' must be true or false")
            cfg = cls(
                id=check_folder_id(fid), path=Path(path), peers=peers, mode=FolderMode(mode),
                label=label, paused=paused,
                rescan_interval_s=_number(d, "rescan_interval_s", DEFAULT_RESCAN_INTERVAL_S,
                                          MAX_RESCAN_INTERVAL_S),
                versions_keep_days=_number(d, "versions_keep_days", DEFAULT_VERSIONS_KEEP_DAYS,
                                           MAX_VERSIONS_KEEP_DAYS),
                versions_keep_count=int(_number(d, "versions_keep_count",
                                                DEFAULT_VERSIONS_KEEP_COUNT,
                                                MAX_VERSIONS_KEEP_COUNT, integer=True)),
            )
        except FolderConfigError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, P2PError) as e:
            raise FolderConfigError(f"bad folder entry {name}: {e}") from None
        check_config(cfg)
        return cfg


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(d: dict[str, Any], key: str, default: float, most: float, *,
            integer: bool = False) -> float:
    value = d.get(key, default)
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and abs(value) <= most
          and (not integer or value == int(value)))
    if not ok:
        raise ValueError(f"{key!r} must be a {'whole ' if integer else ''}number of at "
                         f"most {most:g}")
    return float(value)


def check_config(cfg: FolderConfig) -> None:
    check_folder_id(cfg.id)
    if not cfg.path.is_absolute():
        raise FolderConfigError(f"folder {cfg.id}: path {cfg.path} is not absolute")
    if len(cfg.peers) > MAX_FOLDER_PEERS:
        raise FolderConfigError(f"folder {cfg.id}: at most {MAX_FOLDER_PEERS} peers")
    if len(cfg.label) > MAX_LABEL_LEN:
        raise FolderConfigError(f"folder {cfg.id}: label longer than {MAX_LABEL_LEN} characters")
    if cfg.rescan_interval_s <= 0 or cfg.versions_keep_days < 0 or cfg.versions_keep_count < 0:
        raise FolderConfigError(f"folder {cfg.id}: intervals and retention must not be negative")


@dataclass
class FolderStore:
    """The folders of one home, loaded from and saved to ``folders.json``."""

    home: Path
    _folders: dict[str, FolderConfig] = field(default_factory=dict)
    _mtime_ns: int = -1

    @property
    def file(self) -> Path:
        return self.home / FOLDERS_FILE_NAME

    @classmethod
    def load(cls, home: Path) -> FolderStore:
        store = cls(home)
        store.reload()
        return store

    def reload(self) -> None:
        """Read the file again (a missing file is no folders); raises FolderConfigError."""
        try:
            st = os.stat(self.file)
            raw = self.file.read_bytes()
        except FileNotFoundError:
            self._folders, self._mtime_ns = {}, -1
            return
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or "folders" not in doc:
                raise ValueError('it must be an object {"version": 1, "folders": [...]}')
            version = doc.get("version", FOLDERS_FILE_VERSION)
            if version != FOLDERS_FILE_VERSION or isinstance(version, bool):
                raise ValueError(f"version {version!r} is not {FOLDERS_FILE_VERSION} (a newer "
                                 "p2pfs wrote it?)")
            entries = doc["folders"]
            if not isinstance(entries, list) or len(entries) > MAX_FOLDERS:
                raise ValueError(f"'folders' must be a list of at most {MAX_FOLDERS} entries")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise FolderConfigError(f"{self.file} is not a valid folders file: {e}") from None
        # a hand edit is checked as `node folder add` checks a new folder: nothing is
        # taken from a file that breaks a rule (the old folders stay in force)
        folders: dict[str, FolderConfig] = {}
        home = Path(os.path.abspath(self.home))
        for entry in entries:
            try:
                cfg = FolderConfig.from_json(entry)
                if cfg.id in folders:
                    raise FolderConfigError(f"folder id {cfg.id!r} is listed twice")
                if _overlaps(cfg.path, home):
                    raise FolderConfigError(f"folder {cfg.id} at {cfg.path} overlaps this "
                                            f"node's home dir {home}, which holds its keys")
                for other in folders.values():
                    if _overlaps(other.path, cfg.path):
                        raise FolderConfigError(f"folder {cfg.id} at {cfg.path} overlaps "
                                                f"folder {other.id} at {other.path}")
            except FolderConfigError as e:
                raise FolderConfigError(f"{self.file}: {e}") from None
            folders[cfg.id] = cfg
        self._folders, self._mtime_ns = folders, st.st_mtime_ns

    def changed(self) -> bool:
        """True when the file changed on disk since the last load or save."""
        try:
            return os.stat(self.file).st_mtime_ns != self._mtime_ns
        except FileNotFoundError:
            return self._mtime_ns != -1

    def save(self) -> None:
        doc = {"version": FOLDERS_FILE_VERSION,
               "folders": [f.to_json() for f in sorted(self._folders.values(), key=lambda f: f.id)]}
        write_private(self.file, (json.dumps(doc, indent=1) + "\n").encode())
        self._mtime_ns = os.stat(self.file).st_mtime_ns

    def __iter__(self) -> Iterator[FolderConfig]:
        return iter(sorted(self._folders.values(), key=lambda f: f.id))

    def __len__(self) -> int:
        return len(self._folders)

    def get(self, folder_id: str) -> FolderConfig | None:
        return self._folders.get(folder_id)

    def require(self, folder_id: str) -> FolderConfig:
        cfg = self._folders.get(folder_id)
        if cfg is None:
            known = ", ".join(sorted(self._folders)) or "none"
            raise FolderConfigError(f"no folder with id {folder_id!r} (folders: {known})")
        return cfg

    def put(self, cfg: FolderConfig) -> None:
        """Add or replace a folder (not saved until ``save()``)."""
        check_config(cfg)
        if cfg.id not in self._folders and len(self._folders) >= MAX_FOLDERS:
            raise FolderConfigError(f"at most {MAX_FOLDERS} folders")
        for other in self._folders.values():
            if other.id != cfg.id and _overlaps(other.path, cfg.path):
                raise FolderConfigError(
                    f"folder {cfg.id} at {cfg.path} overlaps folder {other.id} at {other.path}")
        self._folders[cfg.id] = cfg

    def update(self, folder_id: str, **changes: Any) -> FolderConfig:
        cfg = replace(self.require(folder_id), **changes)
        self.put(cfg)
        return cfg

    def remove(self, folder_id: str) -> FolderConfig:
        cfg = self.require(folder_id)
        del self._folders[folder_id]
        return cfg

    def for_peer(self, peer: PeerId) -> list[FolderConfig]:
        return [f for f in self if f.shared_with(peer)]


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents
