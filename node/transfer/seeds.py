"""Chunk reuse: local files whose chunks a receiver copies instead of fetching them.

A fetch may name *seeds*: local files (the old version of the file, other files of
the folder) that probably share chunks with what is coming. For a manifest entry
with chunk size C, each seed is cut at multiples of C and each piece hashed with
BLAKE3 (through the manifest cache when C is the seed's own default chunk size);
a missing chunk whose hash equals a seed piece is read from the seed and handed to
``PartialFile.write_chunk``, which hashes it again before writing it, exactly as a
chunk from the wire. So a seed that changed between the hash and the copy is
caught and its chunk simply stays missing (fetched from the peer), and a seeded
chunk that was written counts as verified in the resume state like any other.

Seeds are chosen by the local caller, never by the peer; a seed that cannot be
read is skipped with a log line. Blocking (reads and hashes): run it in a worker
thread. Must not import the channel, transports, session or daemon.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.errors import LocalIOError
from node.transfer.manifest import (
    DEFAULT_CACHE,
    HASH_LEN_BYTES,
    FileEntry,
    chunk_size_for,
    hash_file,
)

if TYPE_CHECKING:
    from node.transfer.store import PartialFile

log = logging.getLogger(__name__)

MAX_SEEDS = 4096  # seeds one fetch may name (the caller's list, bounded all the same)


@dataclass(frozen=True, slots=True)
class SeedPiece:
    """Where a chunk-aligned piece of a seed lives: file, byte offset, length."""

    path: Path
    offset: int
    length: int


class SeedIndex:
    """BLAKE3 of every chunk-aligned piece of the seeds, per chunk size, built lazily."""

    def __init__(self, seeds: Sequence[Path | str]) -> None:
        if len(seeds) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds per fetch")
        self.seeds = [Path(s) for s in seeds]
        self._by_chunk_size: dict[int, dict[bytes, SeedPiece]] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.seeds)

    def pieces(self, chunk_size: int) -> dict[bytes, SeedPiece]:
        with self._lock:
            index = self._by_chunk_size.get(chunk_size)
            if index is None:
                index = self._build(chunk_size)
                self._by_chunk_size[chunk_size] = index
            return index

    def _build(self, chunk_size: int) -> dict[bytes, SeedPiece]:
        index: dict[bytes, SeedPiece] = {}
        for path in self.seeds:
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    continue
                if chunk_size == chunk_size_for(st.st_size):
                    _, hashes, _ = DEFAULT_CACHE.get_or_hash(path, st)
                else:
                    _, hashes, _ = hash_file(path, chunk_size=chunk_size)
            except (OSError, LocalIOError) as exc:
                log.info("seed %s skipped: %s", path, exc)
                continue
            for i in range(len(hashes) // HASH_LEN_BYTES):
                h = hashes[i * HASH_LEN_BYTES:(i + 1) * HASH_LEN_BYTES]
                offset = i * chunk_size
                index.setdefault(h, SeedPiece(path, offset, min(chunk_size, st.st_size - offset)))
        return index

    def matches(self, entry: FileEntry, missing: Sequence[int]) -> list[tuple[int, SeedPiece]]:
        """(chunk, seed piece) for each missing chunk of `entry` some seed holds."""
        if not self.seeds or not missing:
            return []
        pieces = self.pieces(entry.chunk_size)
        out: list[tuple[int, SeedPiece]] = []
        for c in missing:
            piece = pieces.get(entry.chunk_hash(c))
            if piece is not None and piece.length == entry.chunk_len(c):
                out.append((c, piece))
        return out


def read_piece(piece: SeedPiece) -> bytes | None:
    """The piece's bytes as they are now (None when the seed is gone or shorter)."""
    try:
        fd = os.open(piece.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        data = os.pread(fd, piece.length, piece.offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == piece.length else None


def seed_partial(partial: PartialFile, seeds: SeedIndex) -> int:
    """Copy every missing chunk of `partial` that a seed holds; the number copied.

    Each copied chunk goes through ``write_chunk`` (hashed again, then written), so
    a seed changed since it was hashed costs nothing but that chunk's fetch.
    """
    if partial.complete:
        return 0
    copied = 0
    for chunk, piece in seeds.matches(partial.entry, partial.missing()):
        data = read_piece(piece)
        if data is None:
            continue
        if partial.write_chunk(chunk, data):
            copied += 1
        else:
            log.info("seed %s changed since it was hashed: chunk %d of %s is fetched",
                     piece.path, chunk, partial.entry.path)
    return copied
