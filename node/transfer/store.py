"""The receiving store: partial files, resume state, verification, atomic rename, versions.

Layout under the received dir::

    <received>/<label>/<relative path>                        finished, verified files
    <received>/<label>/<dir>/.<name>.<root16>.p2pfs-part       chunks written at their offsets
    <received>/<label>/<dir>/.<name>.<root16>.p2pfs-state      msgpack: which chunks are verified
    <received>/<label>/.p2pfs-versions/<path>.<UTC timestamp>  older contents that were replaced

A chunk counts only after its BLAKE3 hash matched the manifest. The state file
is written (after an fdatasync of the partial file) every few chunks, so a
restarted receiver resumes; chunks it lists are re-verified from disk on
resume, so a torn write after a crash is fetched again, never trusted. At the
end the file is fsynced, its mode/mtime applied, an existing different file
moved into the versions folder, and the partial renamed into place atomically.

All methods block (disk I/O, hashing): call them from a worker thread.
Must not import the channel, transports, session or daemon.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import mmap
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

from node.errors import LocalIOError, ProtocolError
from node.transfer.manifest import (
    DEFAULT_CACHE,
    FileEntry,
    chunk_size_for,
    hash_chunk,
    hash_file,
)
from node.transfer.paths import (
    PARTIAL_SUFFIX,
    STATE_SUFFIX,
    VERSIONS_DIR_NAME,
    PathBlocked,
    ensure_dirs,
    local_io_error,
    resolve_under,
    safe_relpath,
)
from node.wire import packb, unpackb

STATE_VERSION = 1
# the partial file is fdatasynced before each state save; only the final fsync before
# the rename matters for safety, so saves are spaced out (a crash re-fetches at most this)
STATE_SAVE_EVERY_CHUNKS = 64
STATE_SAVE_INTERVAL_S = 1.0
PARTIAL_NAME_PREFIX_BYTES = 100
MAX_STATE_FILE_BYTES = 64 << 10
# a received file never gets group/world write (nor setuid/setgid/sticky: masked by 0o777)
RECEIVED_NEVER_BITS = 0o022
# Chunks of files at least this large are written with O_DIRECT (Linux), from a reused
# page-aligned buffer: the copy into fresh page-cache pages (and ext4's per-page
# bookkeeping) cost more CPU than the chunk's hash; the disk gets the data at once, so
# the periodic fdatasync and the final fsync find little left to write. A file system
# that refuses O_DIRECT, or a chunk tail that is not block-aligned, is written as usual.
DIRECT_IO_MIN_FILE_BYTES = 8 << 20
DIRECT_IO_ALIGN_BYTES = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class PartialBusy(PathBlocked):
    """Another session is receiving this partial file; ``holder`` is whoever planned it."""

    def __init__(self, message: str, holder: object = None) -> None:
        super().__init__(message)
        self.holder = holder


class PlanKind(Enum):
    NEED = "need"
    HAVE = "have"


def _clip_name(name: str, limit: int) -> str:
    return name.encode("utf-8")[:limit].decode("utf-8", "ignore")


def partial_names(final_name: str, root: bytes) -> tuple[str, str]:
    stem = f".{_clip_name(final_name, PARTIAL_NAME_PREFIX_BYTES)}.{root.hex()[:16]}"
    return stem + PARTIAL_SUFFIX, stem + STATE_SUFFIX


_LIBC: list[ctypes.CDLL | None] = []


def _syncfs(fd: int) -> bool:
    """syncfs(2) on the file system holding `fd` (Linux); False where it does not exist."""
    if not _LIBC:
        try:
            libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None
        _LIBC.append(libc if libc is not None and hasattr(libc, "syncfs") else None)
    libc = _LIBC[0]
    if libc is None:
        return False
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PartialFile:
    """One file being received: an open partial file plus its verified-chunk bitmap."""

    def __init__(self, store: ReceiveStore, folder: Path, rel: PurePosixPath, entry: FileEntry,
                 final: Path) -> None:
        self.store = store
        self.folder = folder
        self.rel = rel
        self.entry = entry
        self.final = final
        part_name, state_name = partial_names(final.name, entry.root)
        self.part_path = final.with_name(part_name)
        self.state_path = final.with_name(state_name)
        self.done = bytearray(entry.chunks)
        self.done_count = 0
        self.fd = -1
        self._dfd = -1  # the same file opened with O_DIRECT, or -1 (see DIRECT_IO_MIN_FILE_BYTES)
        self._bounce: mmap.mmap | None = None  # page-aligned buffer the direct writes go from
        self._unsaved = 0
        self._last_save = time.monotonic()
        # periodic saves run in their own thread so chunk writes go on during the fdatasync
        self._saver: threading.Thread | None = None
        self._save_error: LocalIOError | None = None
        self.resumed_bytes = 0
        # a worker thread may be writing while a cancelled task closes the file
        self._lock = threading.RLock()

    # -- opening / resume -------------------------------------------------
    def open(self) -> None:
        e = self.entry
        try:
            ensure_dirs(self.folder, self.rel.parent)
            resolve_under(self.folder, self.rel)  # re-check after creating parents
            for p in (self.part_path, self.state_path):
                if os.path.islink(p):
                    raise PathBlocked(f"refusing to write through the symlink {p}")
            flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0))
            self.fd = os.open(self.part_path, flags, 0o600)
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise LocalIOError(f"{self.part_path} is not a regular file")
            if st.st_size != e.size:
                os.ftruncate(self.fd, e.size)
            self._open_direct()
        except OSError as exc:
            self.close()
            raise local_io_error(exc, f"cannot open {self.part_path}") from None
        except LocalIOError:
            self.close()
            raise
        self._load_state()

    def _open_direct(self) -> None:
        """Open the partial file a second time with O_DIRECT, where that works."""
        if (not _O_DIRECT or not self.store.direct_io
                or self.entry.size < DIRECT_IO_MIN_FILE_BYTES
                or self.entry.chunk_size % DIRECT_IO_ALIGN_BYTES):
            return
        try:
            self._dfd = os.open(self.part_path, os.O_WRONLY | _O_DIRECT
                                | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self._dfd = -1  # e.g. EINVAL: this file system has no O_DIRECT
            return
        if os.fstat(self._dfd).st_ino != os.fstat(self.fd).st_ino:  # replaced meanwhile
            self._drop_direct()

    def _drop_direct(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def _write_data(self, data: bytes | memoryview, offset: int) -> None:
        """Write a verified chunk at `offset`: its block-aligned part with O_DIRECT when the
        file has a direct descriptor, the rest (or all of it) through the page cache."""
        direct = 0
        if self._dfd >= 0 and offset % DIRECT_IO_ALIGN_BYTES == 0:
            direct = len(data) - len(data) % DIRECT_IO_ALIGN_BYTES
        if direct:
            if self._bounce is None or len(self._bounce) < direct:
                if self._bounce is not None:
                    self._bounce.close()
                self._bounce = mmap.mmap(-1, max(direct, self.entry.chunk_size))
            with memoryview(self._bounce) as bounce, memoryview(data) as src:
                bounce[:direct] = src[:direct]
                try:
                    self.store._write_at(self._dfd, bounce[:direct], offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    direct = 0  # alignment this file system does not take: buffered from now
            if not direct:
                self._drop_direct()
        if direct < len(data):
            with memoryview(data) as src:
                self.store._write_at(self.fd, src[direct:], offset + direct)

    def _load_state(self) -> None:
        e = self.entry
        try:
            with open(self.state_path, "rb") as f:
                raw = f.read(MAX_STATE_FILE_BYTES + 1)
            obj = unpackb(raw, max_bytes=MAX_STATE_FILE_BYTES)
        except (OSError, ProtocolError):
            return
        if (not isinstance(obj, list) or len(obj) != 5 or obj[0] != STATE_VERSION
                or obj[1] != e.root or obj[2] != e.size or obj[3] != e.chunk_size
                or not isinstance(obj[4], bytes) or len(obj[4]) * 8 < e.chunks):
            return
        bitmap: bytes = obj[4]
        # re-verify what the state claims: a crash may have torn the last writes
        for i in range(e.chunks):
            if bitmap[i >> 3] & (1 << (i & 7)):
                try:
                    data = os.pread(self.fd, e.chunk_len(i), i * e.chunk_size)
                except OSError:
                    continue
                if len(data) == e.chunk_len(i) and hash_chunk(data) == e.chunk_hash(i):
                    self.done[i] = 1
                    self.done_count += 1
                    self.resumed_bytes += len(data)

    def missing(self) -> list[int]:
        return [i for i, d in enumerate(self.done) if not d]

    @property
    def complete(self) -> bool:
        return self.done_count == self.entry.chunks

    # -- chunks -------------------------------------------------------------
    def write_chunk(self, index: int, data: bytes | memoryview) -> bool:
        """Verify and write one chunk; False if its hash does not match (nothing counted)."""
        with self._lock:
            return self._write_chunk_locked(index, data)

    def save_state(self) -> None:
        """fdatasync the partial file, then atomically record which chunks it holds."""
        with self._lock:
            self._join_saver()
            self._save_state_locked()

    def finalize(self, batch: bool = False) -> Path:
        """Check, fsync, apply mode/mtime, keep an old version, rename into place.

        With `batch`, the folder's fsync and the sweep of stale partials are left to
        ``ReceiveStore.finish_batch`` (once per folder for many files). The file itself
        is always fsynced before the rename, so its final name never shows a torn file.
        """
        with self._lock:
            self._join_saver()
            return self._finalize_locked(batch)

    def close(self) -> None:
        with self._lock:
            self._join_saver()
            self._close_locked()

    def _join_saver(self) -> None:
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.join()

    def _bitmap(self) -> bytes:
        bitmap = bytearray((len(self.done) + 7) // 8)
        for i, d in enumerate(self.done):
            if d:
                bitmap[i >> 3] |= 1 << (i & 7)
        return bytes(bitmap)

    def _start_background_save(self) -> None:
        """Save the state in a thread: the chunks written so far, once fdatasync says so.

        The bitmap is taken before the fdatasync, so it only lists chunks that the
        fdatasync covers; chunks written meanwhile are saved the next time. The
        thread syncs a duplicate of the file descriptor, so closing ours is safe.
        """
        bitmap = self._bitmap()
        fd = os.dup(self.fd)
        self._unsaved = 0
        self._last_save = time.monotonic()
        saver = threading.Thread(target=self._background_save, args=(fd, bitmap),
                                 name="p2pfs-state", daemon=True)
        self._saver = saver
        saver.start()

    def _background_save(self, fd: int, bitmap: bytes) -> None:
        try:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self._write_state(bitmap)
        except OSError as exc:
            self._save_error = local_io_error(exc, f"cannot save progress of {self.final}")

    def _write_chunk_locked(self, index: int, data: bytes | memoryview) -> bool:
        """Verify and write one chunk; False if its hash does not match (nothing counted)."""
        e = self.entry
        if self.fd < 0:
            raise LocalIOError(f"{self.final}: chunk written after the partial file was closed")
        if hash_chunk(data) != e.chunk_hash(index):
            return False
        if self.done[index]:
            return True
        try:
            self._write_data(data, index * e.chunk_size)
        except OSError as exc:
            raise local_io_error(exc, f"cannot write {self.final}") from None
        self.done[index] = 1
        self.done_count += 1
        self._unsaved += 1
        if self._save_error is not None:
            raise self._save_error
        now = time.monotonic()
        if ((self._unsaved >= STATE_SAVE_EVERY_CHUNKS
             or now - self._last_save >= STATE_SAVE_INTERVAL_S)
                and (self._saver is None or not self._saver.is_alive())
                and not self.complete):  # the final fsync + rename follow at once
            self._join_saver()
            try:
                self._start_background_save()
            except OSError as exc:
                raise local_io_error(exc, f"cannot save progress of {self.final}") from None
        return True

    def _save_state_locked(self) -> None:
        """fdatasync the partial file, then atomically record which chunks it holds."""
        if self.fd < 0 or self._unsaved == 0:
            return
        try:
            os.fdatasync(self.fd)
            self._write_state(self._bitmap())
        except OSError as exc:
            raise local_io_error(exc, f"cannot save progress of {self.final}") from None
        self._unsaved = 0
        self._last_save = time.monotonic()

    def _write_state(self, bitmap: bytes) -> None:
        """Atomically replace the state file (OSError on failure)."""
        e = self.entry
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            os.write(fd, packb([STATE_VERSION, e.root, e.size, e.chunk_size, bitmap]))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)

    # -- finishing ----------------------------------------------------------
    def _finalize_locked(self, batch: bool = False) -> Path:
        """Check, fsync, apply mode/mtime, keep an old version, rename into place."""
        self._prepare_locked(fsync=True)
        return self._place_locked(batch)

    def _prepare_locked(self, *, fsync: bool) -> None:
        """Check the partial is whole, apply its mode and mtime (and fsync it)."""
        e = self.entry
        if not self.complete:
            raise LocalIOError(f"{self.final}: finalize before all chunks arrived")
        try:
            if os.fstat(self.fd).st_size != e.size:
                raise LocalIOError(f"{self.part_path} changed size on disk while receiving")
            if fsync:
                os.fsync(self.fd)
            self._unsaved = 0  # renamed next: no resume state to save on close
            os.fchmod(self.fd, received_mode(e.mode, self.store.umask))
            os.utime(self.fd, ns=(e.mtime_ns, e.mtime_ns))
        except OSError as exc:
            raise local_io_error(exc, f"cannot finish {self.final}") from None

    def _place_locked(self, batch: bool) -> Path:
        """Rename the (durable) partial into place, keeping a different old file as a version."""
        e = self.entry
        self._unsaved = 0
        self.close()
        final = resolve_under(self.folder, self.rel)
        st = _lstat_or_none(final)
        try:
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    raise PathBlocked(f"{final} is in the way: it is not a regular file")
                if not self.store.same_content(final, e):
                    self.store.keep_version(self.folder, self.rel, final)
            os.rename(self.part_path, final)
            if not batch:
                _fsync_dir(final.parent)
        except OSError as exc:
            raise local_io_error(exc, f"cannot move {final} into place") from None
        try:
            os.unlink(self.state_path)
        except OSError:
            pass
        if not batch:
            self.store.remove_stale_partials(final)
        return final

    def _close_locked(self) -> None:
        if self.fd >= 0:
            try:
                self.save_state()
            except LocalIOError:
                pass
            finally:
                os.close(self.fd)
                self.fd = -1
                self._drop_direct()


@dataclass
class FilePlan:
    kind: PlanKind
    final: Path
    partial: PartialFile | None = None

    @property
    def missing(self) -> list[int]:
        return self.partial.missing() if self.partial is not None else []


def current_umask() -> int:
    """The process umask, read without a window in which it is wider than before."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # a file created meanwhile gets fewer rights, never more
    os.umask(old)
    return old


def received_mode(sender_mode: int, umask: int) -> int:
    """Mode of a finished received file: the sender's permission bits masked with our
    umask, never group/world write and never setuid/setgid/sticky; always readable
    and writable by us (we verify, replace and version our copy)."""
    return (sender_mode & 0o777 & ~umask & ~RECEIVED_NEVER_BITS) | 0o600


class ReceiveStore:
    """Where received files go: ``<received_dir>/<label>/<relative path>``."""

    def __init__(self, received_dir: Path, *, umask: int | None = None,
                 direct_io: bool = True) -> None:
        self.received_dir = Path(received_dir)
        self.umask = current_umask() if umask is None else umask
        self.direct_io = direct_io  # big files' chunks written with O_DIRECT where possible
        self._active: dict[Path, object] = {}  # partial file -> the session holding it
        self._lock = threading.Lock()

    def _write_at(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        """pwrite all of `data` at `offset` (a seam tests use to inject ENOSPC)."""
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
            offset += n

    def folder(self, label: str) -> Path:
        rel = safe_relpath(label)
        if len(rel.parts) != 1:
            raise ProtocolError("a sender label is a single folder name")
        try:
            os.makedirs(self.received_dir, exist_ok=True)
        except OSError as exc:
            raise local_io_error(exc, f"cannot create {self.received_dir}") from None
        return ensure_dirs(self.received_dir, rel)

    def same_content(self, path: Path, entry: FileEntry) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            return False
        if entry.chunk_size == chunk_size_for(entry.size):
            _, _, root = DEFAULT_CACHE.get_or_hash(path, st)
        else:
            _, _, root = hash_file(path, chunk_size=entry.chunk_size)
        return root == entry.root

    def keep_version(self, folder: Path, rel: PurePosixPath, final: Path) -> Path:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        vdir = ensure_dirs(folder, PurePosixPath(VERSIONS_DIR_NAME, *rel.parent.parts))
        base = f"{_clip_name(rel.name, 200)}.{stamp}"
        target = vdir / base
        n = 1
        while os.path.lexists(target):
            target = vdir / f"{base}-{n}"
            n += 1
        os.rename(final, target)
        return target

    def remove_stale_partials(self, final: Path) -> None:
        """Drop leftover partial/state files of older contents of `final` (not in use)."""
        self._remove_stale_partials(final.parent, [final.name])

    def commit_batch(self, partials: list[PartialFile]) -> list[Path | PathBlocked]:
        """Finalize several complete partial files with one file-system sync (blocking).

        Each is checked and gets its mode and mtime; then ONE ``syncfs`` makes all their
        data durable (where there is no syncfs, each file is fsynced); only then are they
        renamed into place, each folder fsynced once. So a final name never shows a torn
        or unverified file, and a batch of small files costs one sync, not one per file.
        A file whose final name is blocked comes back as its PathBlocked; a failing disk
        raises LocalIOError (the files stay partial, their resume state is kept).
        """
        if not partials:
            return []
        try:
            for partial in partials:
                with partial._lock:
                    partial._join_saver()
                    partial._prepare_locked(fsync=False)
            try:
                if not _syncfs(partials[0].fd):
                    for partial in partials:
                        os.fsync(partial.fd)
            except OSError as exc:
                raise local_io_error(exc, f"cannot sync {partials[0].folder}") from None
        except BaseException:
            for partial in partials:
                partial._unsaved = 1  # not renamed: keep the resume state on close
            raise
        out: list[Path | PathBlocked] = []
        for partial in partials:
            try:
                with partial._lock:
                    out.append(partial._place_locked(True))
            except PathBlocked as exc:
                out.append(exc)
        self.finish_batch([p for p in out if isinstance(p, Path)])
        return out

    def finish_batch(self, finals: list[Path]) -> None:
        """After a batch of ``finalize(batch=True)``: fsync each folder once (the renames
        become durable) and sweep stale partials with one listing per folder (blocking)."""
        by_dir: dict[Path, list[str]] = {}
        for final in finals:
            by_dir.setdefault(final.parent, []).append(final.name)
        for parent, names in by_dir.items():
            _fsync_dir(parent)
            self._remove_stale_partials(parent, names)

    def _remove_stale_partials(self, parent: Path, final_names: list[str]) -> None:
        stems = {f".{_clip_name(n, PARTIAL_NAME_PREFIX_BYTES)}." for n in final_names}
        suffix = re.compile(r"[0-9a-f]{16}\.p2pfs-(part|state)$")
        try:
            with os.scandir(parent) as it:
                names = [e.name for e in it if e.name.startswith(".")]
        except OSError:
            return
        with self._lock:
            active = set(self._active)
        for name in names:
            m = suffix.search(name)
            if m is None or name[:m.start()] not in stems:
                continue
            path = parent / name
            if path.with_suffix(PARTIAL_SUFFIX) not in active:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def free_bytes(self, path: Path) -> int | None:
        try:
            st = os.statvfs(path)
        except (OSError, AttributeError):
            return None
        return st.f_bavail * st.f_frsize

    def plan(self, folder: Path, entry: FileEntry, holder: object = None) -> FilePlan:
        """Decide what to fetch for `entry`: HAVE (identical file there) or NEED + partial.

        LocalIOError when the path is blocked locally (symlink, file in the way),
        the disk is full or not writable; PartialBusy (naming its holder) while
        another session holds the partial file. `holder` marks this one's.
        """
        rel = safe_relpath(entry.path)
        final = resolve_under(folder, rel)
        st = _lstat_or_none(final)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise PathBlocked(f"{final} is in the way: it is a folder")
            if stat.S_ISREG(st.st_mode) and self.same_content(final, entry):
                return FilePlan(PlanKind.HAVE, final)
        partial = PartialFile(self, folder, rel, entry, final)
        with self._lock:
            if partial.part_path in self._active:
                raise PartialBusy(f"{final} is already being received",
                                  self._active[partial.part_path])
            self._active[partial.part_path] = holder
        try:
            partial.open()
            need = entry.size - partial.resumed_bytes
            free = self.free_bytes(partial.part_path.parent)
            if free is not None and need > free:
                raise LocalIOError(
                    f"cannot receive {final}: disk full ({need} bytes needed, {free} free)")
        except BaseException:
            self.release(partial)
            raise
        return FilePlan(PlanKind.NEED, final, partial)

    def release(self, partial: PartialFile) -> None:
        partial.close()
        with self._lock:
            self._active.pop(partial.part_path, None)


def _lstat_or_none(path: Path) -> os.stat_result | None:
    """lstat, or None when nothing is there; LocalIOError for any other failure."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise local_io_error(exc, f"cannot inspect {path}") from None
