"""What the folder driver does to the disk: scan, place, archive, prune. All blocking.

* ``scan``: walk the folder (never following a symlink), compare with the
  local index, and return the new FileInfo of every name that changed (created,
  edited, touched or mode changed, deleted), each with our counter bumped (a
  touch or chmod is a metadata-only version: same hash, new mtime/mode). Unchanged size +
  mtime + mode skips hashing. Symlinks whose target stays inside the folder are
  recorded as symlinks; others are skipped with one warning each.
* ``archive``: move a file or symlink into ``.p2pfs-versions/<name>~<stamp>``
  (nothing the sync replaces or deletes is destroyed); an empty directory is
  removed, a non-empty one is left in place.
* ``place``: move a verified staged file (fetched into the home's
  ``folder-staging/<id>``, so nothing churns inside the watched folder) into
  place, what was there archived first, with the version's mtime and its mode
  masked as received files are.
* ``prune_versions``: keep at most N versions per file and none older than D days.
* ``untouched``: the disk still holds what the local index says (so an edit
  made since the last scan is never overwritten; the next scan records it).
* ``write_marker`` / ``has_marker``: the ``.p2pfs-folder`` file in the folder's
  root, made when the folder is added (or first synced). A folder whose index
  knows files but whose marker is gone is an unmounted disk or a path replaced
  by an empty directory: the driver then scans and syncs nothing (scanning it
  would announce every file as deleted), like Syncthing's ``.stfolder``.

Every path goes through node.pathrules (``resolve_under``/``ensure_dirs``).
Imports node.pathrules, node.fileindex, node.transfer.store (mode masking) and
the folder model.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import os
import posixpath
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from node.errors import ProtocolError
from node.fileindex import hash_file
from node.folders.ignore import MARKER_FILE_NAME
from node.folders.model import MODE_MASK, FileInfo, FileKind
from node.folders.vector import Vector
from node.pathrules import VERSIONS_DIR_NAME, PathBlocked, ensure_dirs, resolve_under, safe_relpath
from node.transfer.store import received_mode

log = logging.getLogger(__name__)

INCOMING_DIR_NAME = ".incoming"  # never used as a version (older layouts staged there)
VERSION_STAMP_RE = re.compile(r"~(\d{8}-\d{6})-(\d{9})$")
MAX_WARNED = 10_000
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned and len(_warned) < MAX_WARNED:
        _warned.add(key)
        log.warning(msg, *args)


def mode_of(st: os.stat_result) -> int:
    return stat.S_IMODE(st.st_mode) & MODE_MASK


def _valid_name(rel: str) -> bool:
    try:
        safe_relpath(rel)
    except ProtocolError as exc:
        _warn_once(rel, "not syncing %s: %s", rel, exc)
        return False
    return True


def symlink_target_inside(rel: str, target: str) -> bool:
    """A relative target that, resolved from the link's folder, stays in the folder."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    return not (joined == ".." or joined.startswith("../") or joined.startswith("/"))


@dataclass(frozen=True, slots=True)
class Seen:
    kind: FileKind
    size: int
    mtime_ns: int
    mode: int
    target: str = ""


def walk(root: Path, ignored: Callable[[str, bool], bool]) -> dict[str, Seen]:
    """name -> what is on disk, for every name that may sync."""
    out: dict[str, Seen] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        keep = []
        for d in sorted(dirnames):
            rel = str(base / d) if str(base) != "." else d
            if d == VERSIONS_DIR_NAME or ignored(rel, True) or not _valid_name(rel):
                continue
            full = Path(dirpath) / d
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                filenames.append(d)  # a symlink to a directory: handled as a symlink
                continue
            out[rel] = Seen(FileKind.DIR, 0, st.st_mtime_ns, mode_of(st))
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = str(base / name) if str(base) != "." else name
            if ignored(rel, False) or not _valid_name(rel):
                continue
            full = Path(dirpath) / name
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[rel] = Seen(FileKind.FILE, st.st_size, st.st_mtime_ns, mode_of(st))
            elif stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(full)
                except OSError:
                    continue
                if not symlink_target_inside(rel, target):
                    _warn_once(str(full), "not syncing the symlink %s: its target %s is "
                               "outside the folder", full, target)
                    continue
                out[rel] = Seen(FileKind.SYMLINK, 0, st.st_mtime_ns, 0o777, target)
    return out


def scan(root: Path, local: dict[str, FileInfo], ignored: Callable[[str, bool], bool], *,
         device: str, clock: int, now_ns: int | None = None
         ) -> tuple[list[FileInfo], int]:
    """(new local FileInfos, our new clock); see the module docstring."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    seen = walk(root, ignored)
    out: list[FileInfo] = []

    def bump(name: str) -> Vector:
        nonlocal clock
        base = local[name].version if name in local else Vector()
        v = base.bump(device, clock)
        clock = v.get(device)
        return v

    for name, s in seen.items():
        old = local.get(name)
        prev = old.hash if old is not None and not old.deleted else b""
        if s.kind is FileKind.FILE:
            if (old is not None and not old.deleted and old.kind is FileKind.FILE
                    and old.size == s.size and old.mtime_ns == s.mtime_ns
                    and old.mode == s.mode):
                continue
            try:
                size, mtime_ns, digest = hash_file(root / name)
                after = os.lstat(root / name)
            except OSError:
                continue  # gone or unreadable meanwhile: the next scan sees it
            if after.st_size != size or after.st_mtime_ns != mtime_ns:
                continue  # still being written: the watcher's next event rescans it
            if (old is not None and not old.deleted and old.kind is FileKind.FILE
                    and old.hash == digest):
                # same bytes, new mtime or mode (a touch, a chmod): a metadata-only
                # version, which the others apply without fetching any content
                out.append(replace(old, size=size, mtime_ns=mtime_ns, mode=s.mode,
                                   version=bump(name), prev_hash=b"", modified_by=device))
                continue
            out.append(FileInfo(name, FileKind.FILE, size, mtime_ns, s.mode, digest, False,
                                bump(name), prev if prev != digest else b"", device))
        elif s.kind is FileKind.DIR:
            if old is not None and not old.deleted and old.kind is FileKind.DIR and (
                    old.mode == s.mode):
                continue
            out.append(FileInfo(name, FileKind.DIR, 0, s.mtime_ns, s.mode, b"", False,
                                bump(name), prev, device))
        else:
            if (old is not None and not old.deleted and old.kind is FileKind.SYMLINK
                    and old.symlink_target == s.target):
                continue
            out.append(FileInfo(name, FileKind.SYMLINK, 0, s.mtime_ns, 0o777, b"", False,
                                bump(name), prev, device, s.target))
    for name, old in local.items():
        if old.deleted or name in seen or ignored(name, old.kind is FileKind.DIR):
            continue
        out.append(replace(old, deleted=True, size=0, hash=b"", symlink_target="",
                           prev_hash=old.hash, version=bump(name), modified_by=device,
                           mtime_ns=now_ns))
    return out, clock


def untouched(root: Path, name: str, info: FileInfo | None) -> bool:
    """The disk at `name` still holds what the index says: `info`, or nothing at all for
    None or a deletion (a file made since the last scan is recorded before anything
    replaces it, so it becomes a conflict copy rather than a version)?"""
    try:
        target = resolve_under(root, safe_relpath(name))
        st = os.lstat(target)
    except FileNotFoundError:
        return info is None or info.deleted
    except (OSError, ProtocolError):
        return False
    if info is None or info.deleted:
        return False
    if info.kind is FileKind.FILE:
        return stat.S_ISREG(st.st_mode) and st.st_size == info.size and (
            st.st_mtime_ns == info.mtime_ns)
    if info.kind is FileKind.DIR:
        return stat.S_ISDIR(st.st_mode)
    return stat.S_ISLNK(st.st_mode)


MARKER_TEXT = ("This folder is synced by p2pfs (folder id {id}). Keep this file: without it "
               "the node takes the folder for an unmounted disk and syncs nothing.\n")


def has_marker(root: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(root / MARKER_FILE_NAME).st_mode)
    except OSError:
        return False


def write_marker(root: Path, folder_id: str) -> None:
    """Create the folder marker (kept if there); OSError when the folder is not writable."""
    if has_marker(root):
        return
    tmp = root / f".{MARKER_FILE_NAME}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(MARKER_TEXT.format(id=folder_id))
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / MARKER_FILE_NAME)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def versions_root(root: Path) -> Path:
    return root / VERSIONS_DIR_NAME


def archive(root: Path, name: str, now: float | None = None) -> Path | None:
    """Move root/name into the versions folder (see the module docstring); the new path,
    or None when nothing was there or it was a directory (removed if empty)."""
    rel = safe_relpath(name)
    target = resolve_under(root, rel)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(target)
        except OSError:
            log.info("keeping folder %s: it is not empty", target)
        return None
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{time.time_ns() % 10**9:09d}"
    dest_rel = PurePosixPath(VERSIONS_DIR_NAME, *rel.parts)
    dest_rel = dest_rel.with_name(f"{dest_rel.name}~{stamp}")
    ensure_dirs(root, dest_rel.parent)
    dest = root.joinpath(*dest_rel.parts)
    os.replace(target, dest)
    return dest


def place(root: Path, info: FileInfo, staged: Path, umask: int) -> FileInfo:
    """Move the verified `staged` file to info.name (archiving what was there); the local
    FileInfo to record (with the mode and mtime the disk now has)."""
    rel = safe_relpath(info.name)
    ensure_dirs(root, rel.parent)
    target = resolve_under(root, rel)
    if os.path.lexists(target):
        if os.path.isdir(target) and not os.path.islink(target):
            archive(root, info.name)  # an empty directory goes; a full one blocks
            if os.path.lexists(target):
                raise PathBlocked(f"{target} is a folder with files in it")
        else:
            archive(root, info.name)
    if os.stat(staged).st_dev != os.stat(target.parent).st_dev:
        # staged on another file system (the home): copy next to the target first, so
        # the rename into place stays atomic
        near = target.with_name(f".{target.name}.{os.urandom(4).hex()}.p2pfs-part")
        shutil.copyfile(staged, near)
        os.unlink(staged)
        staged = near
    os.chmod(staged, received_mode(info.mode, umask))
    os.utime(staged, ns=(info.mtime_ns, info.mtime_ns))
    os.replace(staged, target)
    st = os.lstat(target)
    return replace(info, mode=mode_of(st), mtime_ns=st.st_mtime_ns, size=st.st_size)


def make_dir(root: Path, info: FileInfo, umask: int) -> FileInfo:
    rel = safe_relpath(info.name)
    target = resolve_under(root, rel)
    if os.path.lexists(target) and not (os.path.isdir(target)
                                        and not os.path.islink(target)):
        archive(root, info.name)
    ensure_dirs(root, rel)
    os.chmod(target, (info.mode & ~umask & 0o777) | 0o700)
    return replace(info, mode=mode_of(os.lstat(target)))


def make_symlink(root: Path, info: FileInfo) -> FileInfo:
    if not symlink_target_inside(info.name, info.symlink_target):
        raise PathBlocked(f"refusing the symlink {info.name}: its target leaves the folder")
    rel = safe_relpath(info.name)
    ensure_dirs(root, rel.parent)
    target = resolve_under(root, rel)
    if os.path.lexists(target):
        archive(root, info.name)
    os.symlink(info.symlink_target, target)
    return replace(info, mtime_ns=os.lstat(target).st_mtime_ns)


def set_meta(root: Path, info: FileInfo, umask: int) -> FileInfo:
    target = resolve_under(root, safe_relpath(info.name))
    if info.kind is FileKind.FILE:
        os.chmod(target, received_mode(info.mode, umask))
        os.utime(target, ns=(info.mtime_ns, info.mtime_ns))
    elif info.kind is FileKind.DIR:
        os.chmod(target, (info.mode & ~umask & 0o777) | 0o700)
    st = os.lstat(target)
    return replace(info, mode=mode_of(st) if info.kind is not FileKind.SYMLINK else 0o777,
                   mtime_ns=st.st_mtime_ns)


def rename_conflict(root: Path, name: str, copy_name: str) -> Path:
    """Rename our losing version to its conflict name (an existing copy is archived)."""
    src = resolve_under(root, safe_relpath(name))
    copy_rel = safe_relpath(copy_name)
    ensure_dirs(root, copy_rel.parent)
    dest = resolve_under(root, copy_rel)
    if os.path.lexists(dest):
        archive(root, copy_name)
    os.rename(src, dest)
    return dest


def prune_versions(root: Path, keep_days: float, keep_count: int, now: float | None = None
                   ) -> int:
    """Delete versions beyond `keep_count` per file (0: no limit) or older than
    `keep_days` (0: no limit); returns how many were deleted."""
    vroot = versions_root(root)
    if not vroot.is_dir():
        return 0
    now = time.time() if now is None else now
    groups: dict[str, list[tuple[str, Path]]] = {}
    for dirpath, dirnames, filenames in os.walk(vroot, followlinks=False):
        if Path(dirpath) == vroot:
            dirnames[:] = [d for d in dirnames if d != INCOMING_DIR_NAME]
        for fname in filenames:
            m = VERSION_STAMP_RE.search(fname)
            if m is None:
                continue
            full = Path(dirpath) / fname
            groups.setdefault(str(full)[:m.start() - len(fname)] + fname[:m.start()],
                              []).append((m.group(1) + m.group(2), full))
    removed = 0
    for items in groups.values():
        items.sort(reverse=True)  # newest first
        for i, (stamp, path) in enumerate(items):
            too_many = keep_count > 0 and i >= keep_count
            try:
                when = calendar.timegm(time.strptime(stamp[:15], "%Y%m%d-%H%M%S"))
            except ValueError:
                continue
            too_old = keep_days > 0 and now - when > keep_days * 86400
            if too_many or too_old:
                try:
                    os.unlink(path)
                    removed += 1
                except OSError:
                    pass
    return removed


def clear_staging(staging: Path) -> None:
    """Drop staged files and partials once nothing is needed any more (no orphans)."""
    if staging.is_dir() and any(staging.iterdir()):
        shutil.rmtree(staging, ignore_errors=True)
