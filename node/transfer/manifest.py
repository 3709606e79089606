"""Manifests: what a file is, chunk by chunk, in hashes.

A ``FileEntry`` names one regular file by its relative posix path, size, mode,
mtime_ns, chunk size, one BLAKE3 hash per chunk, and a root hash
``BLAKE3(chunk_hash_0 || ... || chunk_hash_n-1 || u64be(size))``. Files are
hashed by streaming (memory bounded by one chunk); ``build_manifest`` walks
directories (symlinks and special files skipped with a warning) and caches
entries by ``(path, size, mtime_ns, inode)``.

The chunk size is 1 MiB, doubled (up to 4 MiB) for huge files so a file never
has more than ``MAX_CHUNKS_PER_FILE`` chunks and its manifest always fits in one
frame. Blocking functions here are meant to run in a worker thread.

Must not import the channel, transports, session or daemon.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import blake3

from node.errors import LocalIOError, ProtocolError
from node.statefiles import is_state_name
from node.transfer.paths import local_io_error, safe_relpath

log = logging.getLogger(__name__)

HASH_LEN_BYTES = 32
DEFAULT_CHUNK_SIZE_BYTES = 1 << 20
MIN_CHUNK_SIZE_BYTES = 64 << 10
MAX_CHUNK_SIZE_BYTES = 4 << 20
MAX_CHUNKS_PER_FILE = 65536  # 2 MiB of hashes: one entry always fits in an 8 MiB frame
MAX_FILE_SIZE_BYTES = MAX_CHUNKS_PER_FILE * MAX_CHUNK_SIZE_BYTES  # 256 GiB
MAX_MTIME_NS = (1 << 63) - 1
MANIFEST_CACHE_ENTRIES = 4096
_SIZE = struct.Struct(">Q")


def chunk_size_for(size: int) -> int:
    chunk = DEFAULT_CHUNK_SIZE_BYTES
    while chunk < MAX_CHUNK_SIZE_BYTES and -(-size // chunk) > MAX_CHUNKS_PER_FILE:
        chunk *= 2
    return chunk


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def hash_chunk(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def root_hash(chunk_hashes: bytes, size: int) -> bytes:
    return blake3.blake3(chunk_hashes + _SIZE.pack(size)).digest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest. `chunk_hashes` is the concatenation of 32-byte hashes."""

    path: str
    size: int
    mode: int
    mtime_ns: int
    chunk_size: int
    chunk_hashes: bytes
    root: bytes

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_hash(self, index: int) -> bytes:
        return self.chunk_hashes[index * HASH_LEN_BYTES : (index + 1) * HASH_LEN_BYTES]

    def chunk_len(self, index: int) -> int:
        start = index * self.chunk_size
        return min(self.chunk_size, self.size - start)

    @property
    def relpath(self) -> PurePosixPath:
        return safe_relpath(self.path)

    def to_wire(self) -> list[object]:
        return [self.path, self.size, self.mode, self.mtime_ns, self.chunk_size,
                self.chunk_hashes, self.root]

    @classmethod
    def from_wire(cls, item: object) -> FileEntry:
        """Validate a peer-supplied entry: types, bounds, safe path and hash consistency."""
        if not isinstance(item, (list, tuple)) or len(item) != 7:
            raise ProtocolError("manifest entry must be a list of 7 fields")
        path, size, mode, mtime_ns, chunk_size, hashes, root = item
        if not isinstance(path, str):
            raise ProtocolError("manifest entry: path must be a string")
        safe_relpath(path)
        for name, value, hi in (("size", size, MAX_FILE_SIZE_BYTES), ("mode", mode, 0o7777),
                                ("mtime_ns", mtime_ns, MAX_MTIME_NS),
                                ("chunk_size", chunk_size, MAX_CHUNK_SIZE_BYTES)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
                raise ProtocolError(f"manifest entry {path[:60]!r}: bad {name}")
        assert isinstance(size, int) and isinstance(chunk_size, int)
        if chunk_size < MIN_CHUNK_SIZE_BYTES or chunk_size & (chunk_size - 1):
            raise ProtocolError(f"manifest entry {path[:60]!r}: bad chunk size {chunk_size}")
        n = chunk_count(size, chunk_size)
        if n > MAX_CHUNKS_PER_FILE:
            raise ProtocolError(f"manifest entry {path[:60]!r}: too many chunks")
        if not isinstance(hashes, bytes) or len(hashes) != n * HASH_LEN_BYTES:
            raise ProtocolError(f"manifest entry {path[:60]!r}: chunk hash list has wrong length")
        if not isinstance(root, bytes) or len(root) != HASH_LEN_BYTES:
            raise ProtocolError(f"manifest entry {path[:60]!r}: bad root hash")
        if root_hash(hashes, size) != root:
            raise ProtocolError(f"manifest entry {path[:60]!r}: root hash contradicts chunk hashes")
        return cls(path, size, int(mode), int(mtime_ns), chunk_size, hashes, root)


def hash_file(path: Path, *, expect_size: int | None = None,
              chunk_size: int | None = None) -> tuple[int, bytes, bytes]:
    """Stream-hash a file: (chunk_size, chunk_hashes, root). Blocking; OSError -> LocalIOError."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size if expect_size is None else expect_size
            chunk = chunk_size or chunk_size_for(size)
            hashes = bytearray()
            buf = bytearray(chunk)
            view = memoryview(buf)
            done = 0
            while done < size:
                want = min(chunk, size - done)
                got = f.readinto(view[:want])
                if not got:
                    break
                while got < want:
                    more = f.readinto(view[got:want])
                    if not more:
                        break
                    got += more
                hashes += hash_chunk(view[:got])
                done += got
                if got < want:
                    break
            if done != size or f.read(1):
                raise LocalIOError(f"{path} changed size while being hashed")
    except OSError as exc:
        raise local_io_error(exc, f"cannot read {path}") from None
    return chunk, bytes(hashes), root_hash(bytes(hashes), size)


class ManifestCache:
    """(path, size, mtime_ns, ctime_ns, inode) -> (chunk_size, chunk_hashes, root); an LRU.

    ctime is in the key because a user (or an attacker with write access) can put an
    mtime back after rewriting a file in place with the same size; ctime cannot be
    set back, so a cached hash never vouches for bytes it did not see."""

    def __init__(self, max_entries: int = MANIFEST_CACHE_ENTRIES) -> None:
        self._max = max_entries
        self._items: OrderedDict[tuple[str, int, int, int, int], tuple[int, bytes, bytes]] = (
            OrderedDict())
        self._lock = threading.Lock()

    def get_or_hash(self, path: Path, st: os.stat_result) -> tuple[int, bytes, bytes]:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        value = hash_file(path, expect_size=st.st_size)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) != key[1:]:
            raise LocalIOError(f"{path} changed while being hashed; try again")
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return value


DEFAULT_CACHE = ManifestCache()


@dataclass(frozen=True)
class SourceFile:
    """A manifest entry plus where it lives on the sender's disk."""

    entry: FileEntry
    abspath: Path
    inode: int


def _rel_text(root: Path, path: Path) -> str | None:
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise LocalIOError(f"{path} is not inside {root}") from None
    text = rel.as_posix() if rel.parts else path.name
    try:
        safe_relpath(text)
    except ProtocolError as exc:
        log.warning("skipping %s: its name cannot be shared (%s)", path, exc)
        return None
    return text


def build_manifest(root: Path, paths: list[Path], *,
                   cache: ManifestCache | None = None) -> list[SourceFile]:
    """Entries for every regular file in `paths` (dirs walked), named relative to `root`.

    Blocking: run it in a thread. Symlinks, special files and unshareable names
    are skipped with a warning. Missing paths raise LocalIOError.
    """
    cache = cache or DEFAULT_CACHE
    root = Path(os.path.abspath(root))
    found: list[Path] = []
    for p in paths:
        p = Path(os.path.abspath(p))
        try:
            st = os.lstat(p)
        except OSError as exc:
            raise local_io_error(exc, f"cannot share {p}") from None
        if stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames.sort()
                for name in sorted(filenames) + [d for d in dirnames
                                                 if os.path.islink(os.path.join(dirpath, d))]:
                    found.append(Path(dirpath) / name)
        else:
            found.append(p)
    out: list[SourceFile] = []
    seen: set[str] = set()
    for p in found:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            log.warning("skipping %s: it vanished", p)
            continue
        except OSError as exc:
            raise local_io_error(exc, f"cannot share {p}") from None
        if stat.S_ISLNK(st.st_mode):
            log.warning("skipping symlink %s", p)
            continue
        if not stat.S_ISREG(st.st_mode):
            log.warning("skipping %s: not a regular file", p)
            continue
        if is_state_name(p.name):
            log.warning("skipping %s: a p2pfs node state file is never sent", p)
            continue
        if st.st_size > MAX_FILE_SIZE_BYTES:
            raise LocalIOError(f"{p} is larger than the {MAX_FILE_SIZE_BYTES >> 30} GiB limit")
        text = _rel_text(root, p)
        if text is None or text in seen:
            continue
        seen.add(text)
        chunk, hashes, root_h = cache.get_or_hash(p, st)
        entry = FileEntry(text, st.st_size, stat.S_IMODE(st.st_mode) & 0o777, st.st_mtime_ns,
                          chunk, hashes, root_h)
        out.append(SourceFile(entry, p, st.st_ino))
    return out
