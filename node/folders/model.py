"""One file's state in a shared folder, and the rules that order two states.

``FileInfo`` is what a device says about one name in a folder: kind (file,
directory, symlink), size, modification time, permission bits (masked to
0o777 as received files are), BLAKE3 hash, deleted flag, version vector, the
hash it replaced (``prev_hash``), the device that made it and a symlink's
target. It travels in signed change events (``to_wire``/``from_wire`` validate
every field) and is what the folder index stores.

The rules (Syncthing's, lib/model/folder_sendrecv.go and FileInfo.WinsConflict):

* a version whose vector dominates replaces the other (the old content goes to
  the versions folder, it is not a conflict);
* equal content (same kind, hash and target, or both deleted) is never a
  conflict whatever the vectors say;
* a concurrent version whose ``prev_hash`` is the other's hash was made from
  it: it wins, and that is not a conflict either;
* otherwise concurrent versions conflict. The winner: modify beats delete, a
  directory beats a file (a directory is never replaced under its contents),
  then the newer modification time, then the higher device key, then the
  higher hash (so every device picks the same winner). The loser is kept as
  ``NAME.sync-conflict-YYYYMMDD-HHMMSS-SHORTID.EXT``, named from its own
  modification time and author, so every device that keeps it picks the same
  name.

Pure: imports node.folders.vector and node.transfer.paths (name rules) only.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

from node.errors import ProtocolError
from node.folders.vector import DEVICE_KEY_LEN, Ordering, Vector, VectorError

HASH_LEN_BYTES = 32
MODE_MASK = 0o777
MAX_FILE_SIZE_BYTES = 2**53
MAX_MTIME_NS = 2**63 - 1
MAX_SYMLINK_TARGET_BYTES = 1024
MAX_NAME_BYTES_TOTAL = 1024
CONFLICT_MARKER = ".sync-conflict-"
SHORT_ID_LEN = 7
_WIRE_FIELDS = 11


class FileKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str  # posix, relative to the folder root
    kind: FileKind
    size: int
    mtime_ns: int
    mode: int
    hash: bytes  # BLAKE3 of the content (files); b"" for directories, symlinks, deletions
    deleted: bool
    version: Vector
    prev_hash: bytes = b""  # the content this version replaced (b"" for a new file)
    modified_by: str = ""  # device key of the author of this version
    symlink_target: str = ""

    # -- content --------------------------------------------------------------
    def same_content(self, other: FileInfo) -> bool:
        """Same bytes on disk (metadata aside): both deleted, or same kind/hash/target."""
        if self.deleted or other.deleted:
            return self.deleted and other.deleted
        return (self.kind is other.kind and self.hash == other.hash
                and self.symlink_target == other.symlink_target)

    def same_metadata(self, other: FileInfo) -> bool:
        return self.same_content(other) and (self.deleted or (
            self.mode == other.mode and (self.kind is FileKind.DIR
                                         or self.mtime_ns == other.mtime_ns)))

    def deletion(self, device: str, clock: int, now_ns: int | None = None) -> FileInfo:
        """This file deleted by `device`: a new version with no content."""
        return replace(self, deleted=True, size=0, hash=b"", symlink_target="",
                       prev_hash=b"" if self.deleted else self.hash,
                       version=self.version.bump(device, clock), modified_by=device,
                       mtime_ns=time.time_ns() if now_ns is None else now_ns)

    def bytes_on_disk(self) -> int:
        return 0 if self.deleted or self.kind is not FileKind.FILE else self.size

    # -- wire -----------------------------------------------------------------
    def to_wire(self) -> list[Any]:
        return [self.name, self.kind.value, self.size, self.mtime_ns, self.mode, self.hash,
                self.deleted, self.version.to_wire(), self.prev_hash, self.modified_by,
                self.symlink_target]

    @classmethod
    def from_wire(cls, obj: Any) -> FileInfo:
        """Decoded msgpack -> FileInfo, every field checked (ProtocolError)."""
        if not isinstance(obj, list) or len(obj) != _WIRE_FIELDS:
            raise ProtocolError(f"file info: expected a list of {_WIRE_FIELDS} fields")
        name, kind, size, mtime_ns, mode, hsh, deleted, vec, prev, by, target = obj
        try:
            info = cls(name, FileKind(kind) if isinstance(kind, str) else kind, size, mtime_ns,
                       mode, hsh, deleted, Vector.from_wire(vec), prev, by, target)
        except (ValueError, VectorError) as exc:
            raise ProtocolError(f"file info: {exc}") from None
        info.check()
        return info

    def check(self) -> None:
        from node.pathrules import check_rel_path

        check_rel_path(self.name)
        if not isinstance(self.kind, FileKind):
            raise ProtocolError("file info: unknown kind")
        for what, value, hi in (("size", self.size, MAX_FILE_SIZE_BYTES),
                                ("mtime_ns", self.mtime_ns, MAX_MTIME_NS),
                                ("mode", self.mode, MODE_MASK)):
            if type(value) is not int or not 0 <= value <= hi:
                raise ProtocolError(f"file info: {what} out of range")
        if type(self.deleted) is not bool:
            raise ProtocolError("file info: deleted must be a boolean")
        for what, h in (("hash", self.hash), ("prev_hash", self.prev_hash)):
            if not isinstance(h, bytes) or len(h) not in (0, HASH_LEN_BYTES):
                raise ProtocolError(f"file info: {what} must be {HASH_LEN_BYTES} bytes or empty")
        if not isinstance(self.modified_by, str) or len(self.modified_by) not in (
                0, DEVICE_KEY_LEN):
            raise ProtocolError("file info: bad modified_by")
        if not isinstance(self.symlink_target, str) or len(
                self.symlink_target.encode("utf-8", "surrogatepass")) > MAX_SYMLINK_TARGET_BYTES:
            raise ProtocolError("file info: bad symlink target")
        if not self.version.counters:
            raise ProtocolError("file info: empty version vector")
        if self.deleted:
            if self.hash or self.size or self.symlink_target:
                raise ProtocolError("file info: a deletion carries no content")
        elif self.kind is FileKind.FILE:
            if len(self.hash) != HASH_LEN_BYTES:
                raise ProtocolError("file info: a file needs its hash")
            if self.symlink_target:
                raise ProtocolError("file info: only a symlink has a target")
        elif self.kind is FileKind.DIR:
            if self.hash or self.size or self.symlink_target:
                raise ProtocolError("file info: a directory has no content")
        elif not self.symlink_target or self.hash:
            raise ProtocolError("file info: a symlink needs a target and no hash")

    def describe(self) -> str:
        state = "deleted" if self.deleted else self.kind.value
        return f"{self.name} ({state} {self.version})"


# -- ordering ---------------------------------------------------------------------
class Resolution(enum.Enum):
    """What a device holding `ours` does when `theirs` is the global version."""

    KEEP = "keep"  # ours is the global version (or dominates it)
    TAKE = "take"  # theirs replaces ours; ours (if any content) goes to the versions folder
    ADOPT = "adopt"  # same content: record theirs, touch nothing (maybe the metadata)
    CONFLICT = "conflict"  # concurrent and different: ours kept as a conflict copy, take theirs


def built_on(a: FileInfo, b: FileInfo) -> bool:
    """`a` was made by editing `b`'s content (a concurrent edit that is no conflict)."""
    return (not a.deleted and not b.deleted and bool(a.prev_hash)
            and a.prev_hash == b.hash and a.hash != b.hash)


def conflict_key(f: FileInfo) -> tuple[int, int, int, str, bytes, str]:
    """Total order of concurrent versions: the larger key wins."""
    return (0 if f.deleted else 1, 1 if f.kind is FileKind.DIR else 0, f.mtime_ns,
            f.modified_by, f.hash, str(f.version))


def wins_conflict(a: FileInfo, b: FileInfo) -> bool:
    """Does `a` beat the concurrent `b`?"""
    if built_on(a, b) and not built_on(b, a):
        return True
    if built_on(b, a) and not built_on(a, b):
        return False
    return conflict_key(a) > conflict_key(b)


def pick_global(candidates: list[FileInfo]) -> FileInfo:
    """The global version among what every device has for one name.

    Versions dominated by another are out; of the rest (pairwise concurrent or
    equal), the winner is the conflict rules' maximum; one built on that winner
    beats it. Depends only on the set of candidates, so every device that sees
    the same set picks the same version.
    """
    if not candidates:
        raise ValueError("no candidates")
    if len(candidates) == 1:
        return candidates[0]
    first = candidates[0].version.counters
    if all(c.version.counters == first for c in candidates):
        alive = list(candidates)  # one version everywhere: nothing dominates (the usual case)
    else:
        alive = [c for c in candidates
                 if not any(o.version.dominates(c.version) for o in candidates)]
    alive.sort(key=conflict_key, reverse=True)
    best = alive[0]
    for c in alive[1:]:
        if built_on(c, best) and not built_on(best, c):
            return c
    return best


def resolve(ours: FileInfo | None, theirs: FileInfo) -> Resolution:
    """What to do when `theirs` is the global version and we hold `ours`."""
    if ours is None:
        return Resolution.TAKE
    order = ours.version.compare(theirs.version)
    if order is Ordering.EQUAL:
        # the same version: where only the metadata differs, ours is how this disk holds
        # it (a mode masked as received files are, a coarser mtime), not a change to make
        return Resolution.KEEP if ours.same_content(theirs) else Resolution.ADOPT
    if order is Ordering.GREATER:
        return Resolution.KEEP
    if ours.same_content(theirs):
        return Resolution.ADOPT
    if order is Ordering.LESSER or built_on(theirs, ours) or ours.deleted:
        return Resolution.TAKE  # a deletion that lost to a modification is no conflict
    if not wins_conflict(theirs, ours):
        return Resolution.KEEP  # theirs is not global after all (callers pass the winner)
    if ours.kind is FileKind.DIR:
        return Resolution.TAKE  # an empty directory has nothing to keep
    return Resolution.CONFLICT


def conflict_name(loser: FileInfo) -> str:
    """`dir/NAME.sync-conflict-YYYYMMDD-HHMMSS-SHORTID.EXT` for the losing version."""
    path = PurePosixPath(loser.name)
    base = path.name
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if dot > 0 else (base, "")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(loser.mtime_ns // 1_000_000_000))
    short = (loser.modified_by or "0" * SHORT_ID_LEN)[:SHORT_ID_LEN]
    new = f"{stem}{CONFLICT_MARKER}{stamp}-{short}{ext}"
    return str(path.with_name(new)) if str(path.parent) != "." else new


def is_conflict_name(name: str) -> bool:
    return CONFLICT_MARKER in PurePosixPath(name).name
