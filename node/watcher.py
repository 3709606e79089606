"""Folder watcher: watchdog file-system events -> debounced, hashed local changes.

``FolderWatcher`` watches one shared folder with watchdog's Observer (a thread)
and hands events to the asyncio loop with ``call_soon_threadsafe``. Each path
gets a debounce timer: a burst of writes becomes one ``LocalChange`` once the
path has been quiet for ``debounce_s``. Content is hashed with BLAKE3 in a
worker thread, never on the loop.

A ``FileIndex`` (node/fileindex.py; SQLite: path -> size, mtime_ns, hash)
remembers what we last announced, so:

* a change whose content equals the index (touch, rewrite of same bytes) is silent;
* ``scan()`` at start compares the folder with the index and reports what was
  created, modified, deleted or moved (same hash at a new path) while stopped;
* ``suppress(path, hash)`` lets the node's own sync writes update the index
  without being announced again (no echo loops between peers).

Ignored: our partial transfers (``*.p2pfs-part``), the versions folder
(``.p2pfs-versions/``), the index itself, and editor temporaries (``*.swp``,
``*.swx``, ``*~``, ``.#*``, ``4913``, ``*.tmp``). An editor's "write temp then
rename over" save shows up as a modification of the target.

An ``ignore(rel, is_dir)`` predicate (a shared folder's ``.p2pfsignore`` rules,
node/folders/ignore.py) hides more names: an ignored name is neither announced
nor, when it was known before, reported deleted; an ignored directory is not
walked. An edit of the ignore file itself rescans the folder.

Imports node.errors, node.fileindex, node.pathrules and node.statefiles; it must
not import gossip, folders, transports or the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from node.errors import LocalIOError, ProtocolError
from node.fileindex import FileIndex, IndexEntry, hash_file  # noqa: F401 (re-exported)
from node.pathrules import check_rel_path
from node.statefiles import is_state_name

# watchdog's inotify thread warns when a directory is re-created at a path it watched
# (a folder's versions dir, a rename back and forth) and then replaces the callback with
# the same one: harmless, and it would land in the node's log on every such rename
warnings.filterwarnings("ignore", message="Callback with id .* already exists for watch",
                        category=RuntimeWarning)

log = logging.getLogger(__name__)

IGNORE_FILE_NAME = ".p2pfsignore"  # node.folders.ignore's file: rescan when it changes
PARTIAL_SUFFIX = ".p2pfs-part"
VERSIONS_DIR = ".p2pfs-versions"
INDEX_SUFFIXES = (".p2pfs-index", ".p2pfs-index-wal", ".p2pfs-index-shm", ".p2pfs-index-journal")
SUPPRESS_TTL_S = 30.0
DEFAULT_DEBOUNCE_S = 0.15
# bad names a watcher remembers having warned about (one warning each, bounded memory)
MAX_WARNED_NAMES = 10_000
# paths settled (hashed, classified, announced) together: one thread hop, one index
# transaction and one on_changes call per batch, not per file
SETTLE_BATCH_MAX = 1000


@dataclass(frozen=True)
class LocalChange:
    kind: str  # created | modified | deleted | moved
    path: str  # posix, relative to the folder
    old_path: str = ""
    size: int = 0
    hash: bytes = b""


def name_problem(rel: str) -> str | None:
    """Why a local file name cannot be announced, or None when it can.

    A name that is not valid UTF-8 (os.walk hands it over with surrogates) cannot
    be encoded into a signed event; a newline or control character could forge
    lines wherever the name is shown.
    """
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in rel):
        return "its name holds a newline or another control character"
    try:
        check_rel_path(rel)
    except ProtocolError as exc:
        return str(exc)
    return None


def regular_file_under(root: Path, rel: str) -> os.stat_result | None:
    """lstat of `root/rel` when it is a regular file reached through no symlink, else None."""
    current = root
    parts = PurePosixPath(rel).parts
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return st if parts and stat.S_ISREG(st.st_mode) else None


def shareable_files(path: Path, limit: int) -> list[tuple[Path, str]]:
    """(file, name relative to path's parent) for `path` itself or the regular files under
    it, at most `limit`; blocking. Symlinks are never followed (`path` itself is taken as
    given), and node state files and names that cannot be announced are skipped with one
    warning each."""
    root = path.parent
    found: list[Path] = []
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            dirnames.sort()
            found.extend(Path(dirpath) / name for name in sorted(filenames))
    else:
        found.append(path)
    out: list[tuple[Path, str]] = []
    for f in found:
        rel = f.relative_to(root).as_posix()
        problem = name_problem(rel)
        if problem is None and is_state_name(f.name):
            problem = "it is a p2pfs node state file"
        if problem is not None:
            log.warning("not announcing %s: %s", f, problem)
            continue
        try:
            st = os.lstat(f)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                log.warning("not announcing the symlink %s", f)
            continue
        out.append((f, rel))
        if len(out) >= limit:
            break
    return out


def is_ignored_name(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if not parts or VERSIONS_DIR in parts:
        return True
    name = parts[-1]
    return is_state_name(name) or (
        name.endswith((PARTIAL_SUFFIX, *INDEX_SUFFIXES, ".swp", ".swx", "~", ".tmp",
                       ".p2pfs-state")) or name.startswith(".#") or name == "4913")


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self._w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._w._from_thread(event)


class FolderWatcher:
    """See the module docstring."""

    def __init__(self, folder: Path, label: str, *, index_path: Path,
                 on_change: Callable[[LocalChange], Awaitable[object]],
                 loop: asyncio.AbstractEventLoop | None = None,
                 debounce_s: float = DEFAULT_DEBOUNCE_S,
                 ignore: Callable[[str, bool], bool] | None = None,
                 on_changes: Callable[[list[LocalChange]], Awaitable[object]] | None = None
                 ) -> None:
        self.folder = Path(folder).resolve()
        self.label = label
        self.index = FileIndex(index_path)
        self._on_change = on_change
        self._on_changes = on_changes
        self._loop = loop
        self.debounce_s = debounce_s
        self._ignore = ignore
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._moves: dict[str, str] = {}  # new path -> old path, pending debounce
        self._ready: dict[str, str] = {}  # quiet paths (-> old path of a move) to settle
        self._settler: asyncio.Task[None] | None = None
        self._suppressed: dict[str, tuple[bytes, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()  # names already reported as not announceable
        self._running = False

    # -- lifecycle -------------------------------------------------------------
    async def start(self, *, scan: bool = True) -> list[LocalChange]:
        """Start watching; with `scan`, report changes made while we were stopped."""
        self._loop = self._loop or asyncio.get_running_loop()
        self._running = True
        if not self.folder.is_dir():
            raise LocalIOError(f"shared folder {self.folder} does not exist or is not a folder")
        observer = Observer()
        try:
            observer.schedule(_Handler(self), str(self.folder), recursive=True)
            observer.daemon = True
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit
            raise LocalIOError(f"cannot watch {self.folder}: {exc} (on Linux, raise "
                               "fs.inotify.max_user_watches)") from None
        self._observer = observer
        return await self.scan() if scan else []

    async def stop(self) -> None:
        self._running = False
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self.index.close()

    # -- public helpers -----------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running

    def rel(self, path: Path | str) -> str | None:
        """Folder-relative posix path, or None when `path` is outside the folder."""
        p = Path(path)
        if not p.is_absolute():
            return PurePosixPath(*p.parts).as_posix() if p.parts else None
        for candidate in (p, p.parent.resolve() / p.name):
            try:
                rel = candidate.relative_to(self.folder).as_posix()
            except ValueError:
                continue
            return rel if rel != "." else None
        return None

    def suppress(self, path: Path | str, hash: bytes) -> None:
        """The node itself is about to write `hash` at `path` (b"" = delete): don't announce it."""
        rel = self.rel(path)
        if rel is not None:
            self._suppressed[rel] = (hash, time.monotonic() + SUPPRESS_TTL_S)

    def ignored(self, rel: str, is_dir: bool = False) -> bool:
        if is_ignored_name(rel):
            return True
        return bool(self._ignore and self._ignore(rel, is_dir))

    def find_by_hash(self, hash: bytes) -> Path | None:
        for rel in self.index.find_by_hash(hash):
            if regular_file_under(self.folder, rel) is not None:
                return self.folder / rel
        return None

    # -- scan at start ------------------------------------------------------------
    async def scan(self) -> list[LocalChange]:
        """Compare the folder with the index; announce and record every difference."""
        async with self._lock:
            on_disk = await asyncio.to_thread(self._walk)
            known = self.index.all()
            created: list[LocalChange] = []
            changes: list[LocalChange] = []
            todo = [rel for rel, (size, mtime_ns) in sorted(on_disk.items())
                    if (e := known.get(rel)) is None or e.size != size
                    or e.mtime_ns != mtime_ns]
            hashed = await asyncio.to_thread(self._hash_many, todo)
            with self.index.transaction():
                for rel, got in zip(todo, hashed, strict=True):
                    entry = known.get(rel)
                    if got is None:
                        continue
                    size, mtime_ns, digest = got
                    self.index.put(rel, size, mtime_ns, digest)
                    if entry is None:
                        created.append(LocalChange("created", rel, size=size, hash=digest))
                    elif entry.hash != digest:
                        changes.append(LocalChange("modified", rel, size=size, hash=digest))
                # a name ignored since is not reported deleted: it only stops syncing
                gone = {rel: e for rel, e in known.items()
                        if rel not in on_disk and not self.ignored(rel)}
                for c in created:
                    # a vanished file with the same content at a new path is a move
                    old = next((r for r, e in gone.items() if e.hash == c.hash), None)
                    if old is not None:
                        del gone[old]
                        self.index.remove(old)
                        changes.append(LocalChange("moved", c.path, old, c.size, c.hash))
                    else:
                        changes.append(c)
                for rel in sorted(gone):
                    self.index.remove(rel)
                    changes.append(LocalChange("deleted", rel))
        await self._emit_many(changes)
        return changes

    def _hash_many(self, rels: list[str]) -> list[tuple[int, int, bytes] | None]:
        out: list[tuple[int, int, bytes] | None] = []
        for rel in rels:
            try:
                out.append(hash_file(self.folder / rel))
            except OSError:
                out.append(None)
        return out

    def _walk(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for root, dirs, files in os.walk(self.folder):
            base = Path(root).relative_to(self.folder)
            dirs[:] = [d for d in dirs if d != VERSIONS_DIR
                       and not self.ignored((base / d).as_posix(), True)]
            for name in files:
                full = Path(root) / name
                rel = full.relative_to(self.folder).as_posix()
                if self.ignored(rel) or not self._valid(rel):
                    continue
                try:
                    st = full.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):  # symlinks, FIFOs, devices
                    continue
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def _valid(self, rel: str) -> bool:
        """False (and one warning per name) for a name that cannot be announced."""
        problem = name_problem(rel)
        if problem is None:
            return True
        if rel not in self._warned and len(self._warned) < MAX_WARNED_NAMES:
            self._warned.add(rel)
            log.warning("not announcing %s in %s: %s", rel, self.folder, problem)
        return False

    # -- live events ----------------------------------------------------------------
    def _from_thread(self, event: FileSystemEvent) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or not self._running:
            return
        try:
            loop.call_soon_threadsafe(self._on_fs_event, event)
        except RuntimeError:  # loop closing
            pass

    def _on_fs_event(self, event: FileSystemEvent) -> None:
        if not self._running:
            return
        if isinstance(event, DirMovedEvent):
            self._schedule_task(self._rescan())
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            old, new = self.rel(os.fsdecode(event.src_path)), self.rel(
                os.fsdecode(event.dest_path))
            if old is not None and new is not None and not self.ignored(old):
                self._moves[new] = self._moves.pop(old, old)
                self._cancel(old)
                self._debounce(new)
            elif old is not None and not self.ignored(old):
                self._debounce(old)  # moved out of the folder: a deletion
            elif new is not None:
                self._debounce(new)  # moved in from outside (or from a temp name)
            return
        if isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileDeletedEvent,
                              FileClosedEvent)):
            rel = self.rel(os.fsdecode(event.src_path))
            if rel == IGNORE_FILE_NAME:
                self._schedule_task(self._rescan())  # names may be (un)ignored now
            elif rel is not None:
                self._debounce(rel)

    def _cancel(self, rel: str) -> None:
        handle = self._timers.pop(rel, None)
        if handle is not None:
            handle.cancel()

    def _debounce(self, rel: str) -> None:
        if self.ignored(rel) or not self._valid(rel):
            return
        assert self._loop is not None
        self._cancel(rel)
        self._timers[rel] = self._loop.call_later(self.debounce_s, self._fire, rel)

    def _fire(self, rel: str) -> None:
        self._timers.pop(rel, None)
        old = self._moves.pop(rel, "")
        self._ready[rel] = old or self._ready.get(rel, "")
        if self._settler is None or self._settler.done():
            self._settler = asyncio.ensure_future(self._settle_ready())
            self._tasks.add(self._settler)
            self._settler.add_done_callback(self._tasks.discard)

    def _schedule_task(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rescan(self) -> None:
        await asyncio.sleep(self.debounce_s)
        if self._running:
            await self.scan()

    async def _settle_ready(self) -> None:
        """Settle every quiet path, a batch at a time: the paths that went quiet while a
        batch was hashed make up the next one (2,000 files dropped at once become a few
        batches, each one thread hop, one index commit and one ``on_changes`` call)."""
        while self._ready and self._running:
            batch = list(self._ready.items())[:SETTLE_BATCH_MAX]
            for rel, _old in batch:
                del self._ready[rel]
            async with self._lock:
                probes = await asyncio.to_thread(self._probe_many, [rel for rel, _ in batch])
                changes: list[LocalChange] = []
                with self.index.transaction():
                    for (rel, old), probe in zip(batch, probes, strict=True):
                        changes += self._classify(rel, old, probe)
            await self._emit_many(changes)

    def _probe_many(self, rels: list[str]) -> list[tuple[int, int, bytes] | None]:
        """(size, mtime_ns, hash) of each path that is a regular file and not being written
        (same size and mtime after hashing), () when it is still being written, None when
        it is not a regular file (blocking)."""
        out: list[tuple[int, int, bytes] | None] = []
        for rel in rels:
            if regular_file_under(self.folder, rel) is None:
                out.append(None)
                continue
            full = self.folder / rel
            try:
                size, mtime_ns, digest = hash_file(full)
                st = full.stat()
            except OSError:
                out.append(_UNREADABLE)
                continue
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                out.append(_BUSY)
                continue
            out.append((size, mtime_ns, digest))
        return out

    def _classify(self, rel: str, old: str, probe: tuple[int, int, bytes] | None
                  ) -> list[LocalChange]:
        entry = self.index.get(rel)
        if probe is None:
            if entry is None:
                return []
            self.index.remove(rel)
            if self._is_suppressed(rel, b""):
                return []
            return [LocalChange("deleted", rel)]
        if probe is _UNREADABLE:
            return []
        if probe is _BUSY:
            self._debounce(rel)  # still being written: wait for it to settle
            if old:
                self._moves[rel] = old
            return []
        size, mtime_ns, digest = probe
        old_entry = self.index.get(old) if old else None
        self.index.put(rel, size, mtime_ns, digest)
        if old_entry is not None:
            self.index.remove(old)
        if self._is_suppressed(rel, digest):
            return []
        if old_entry is not None and old_entry.hash == digest and entry is None:
            return [LocalChange("moved", rel, old, size, digest)]
        out: list[LocalChange] = []
        if old_entry is not None:
            # renamed over something / content changed on the way: a deletion + a write
            out.append(LocalChange("deleted", old))
        if entry is not None and entry.hash == digest:
            return out  # same content (touch, or a rewrite of identical bytes)
        out.append(LocalChange("modified" if entry is not None else "created", rel,
                               size=size, hash=digest))
        return out

    def _is_suppressed(self, rel: str, digest: bytes) -> bool:
        item = self._suppressed.get(rel)
        if item is None:
            return False
        expected, until = item
        if time.monotonic() > until:
            del self._suppressed[rel]
            return False
        if expected == digest:
            del self._suppressed[rel]
            return True
        return False

    async def _emit(self, change: LocalChange) -> None:
        try:
            await self._on_change(change)
        except Exception:  # a failing consumer must not kill the watcher
            log.exception("on_change failed for %s %s", change.kind, change.path)

    async def _emit_many(self, changes: list[LocalChange]) -> None:
        if not changes:
            return
        if self._on_changes is None:
            for change in changes:
                await self._emit(change)
            return
        try:
            await self._on_changes(changes)
        except Exception:  # a failing consumer must not kill the watcher
            log.exception("on_changes failed for %d changes", len(changes))


class _TreeHandler(FileSystemEventHandler):
    def __init__(self, watcher: TreeWatcher) -> None:
        self._w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._w._from_thread(event)


class TreeWatcher:
    """Watches a folder tree and calls ``on_dirty()`` on the loop when anything in it
    changed (a shared folder's driver then scans it). Names for which ``ignore(rel)`` is
    true (the versions folder, say) do not count. Directory events count too, so an
    empty directory made or removed is noticed."""

    def __init__(self, folder: Path, on_dirty: Callable[[], None], *,
                 ignore: Callable[[str], bool] | None = None) -> None:
        self.folder = Path(folder).resolve()
        self._on_dirty = on_dirty
        self._ignore = ignore
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.folder.is_dir():
            raise LocalIOError(f"folder {self.folder} does not exist or is not a folder")
        observer = Observer()
        try:
            observer.schedule(_TreeHandler(self), str(self.folder), recursive=True)
            observer.daemon = True
            observer.start()
        except OSError as exc:
            raise LocalIOError(f"cannot watch {self.folder}: {exc} (on Linux, raise "
                               "fs.inotify.max_user_watches)") from None
        self._observer = observer

    async def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)

    def _counts(self, raw: bytes | str) -> bool:
        path = os.fsdecode(raw)
        try:
            rel = Path(path).relative_to(self.folder).as_posix()
        except ValueError:
            return False
        return rel != "." and not (self._ignore is not None and self._ignore(rel))

    def _from_thread(self, event: FileSystemEvent) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._observer is None:
            return
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path] + ([event.dest_path] if getattr(event, "dest_path", "")
                                    else [])
        if any(self._counts(p) for p in paths):
            try:
                loop.call_soon_threadsafe(self._on_dirty)
            except RuntimeError:  # loop closing
                pass


# probe results besides (size, mtime_ns, hash) and None (not a regular file)
_UNREADABLE: tuple[int, int, bytes] = (-1, -1, b"unreadable")
_BUSY: tuple[int, int, bytes] = (-1, -1, b"busy")
