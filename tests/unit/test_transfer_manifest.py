"""Manifests and transfer messages: hashing, chunk sizing, caching, bounded decoding."""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import ProtocolError
from node.transfer import manifest as mf
from node.transfer.manifest import FileEntry, ManifestCache, build_manifest, chunk_size_for
from node.transfer.protocol import (
    MAX_FILES_PER_OFFER,
    TO_SINK,
    TO_SOURCE,
    ChunkData,
    FileStatus,
    Offer,
    decode,
    offer_batches,
)
from node.wire import MAX_FRAME_BYTES, packb


def test_chunk_size_grows_for_huge_files_and_caps() -> None:
    assert chunk_size_for(0) == 1 << 20
    assert chunk_size_for(10 << 30) == 1 << 20
    assert chunk_size_for(100 << 30) == 2 << 20
    assert chunk_size_for(200 << 30) == 4 << 20
    assert mf.chunk_count(mf.MAX_FILE_SIZE_BYTES, chunk_size_for(mf.MAX_FILE_SIZE_BYTES)) \
        <= mf.MAX_CHUNKS_PER_FILE


def test_hash_file_matches_independent_blake3(tmp_path: Path) -> None:
    data = os.urandom((3 << 20) + 12345)
    p = tmp_path / "f"
    p.write_bytes(data)
    chunk, hashes, root = mf.hash_file(p)
    assert chunk == 1 << 20
    expect = b"".join(blake3.blake3(data[i:i + chunk]).digest() for i in range(0, len(data), chunk))
    assert hashes == expect
    assert root == blake3.blake3(expect + len(data).to_bytes(8, "big")).digest()


def test_build_manifest_walks_dirs_skips_symlinks_and_caches(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "deep.txt").write_bytes(b"deep")
    (src / "top.bin").write_bytes(os.urandom(5000))
    os.chmod(src / "top.bin", 0o751)
    os.symlink("/etc/passwd", src / "link")
    os.symlink(src / "a", src / "dirlink")
    os.mkfifo(src / "fifo")
    (src / "bad\\name").write_text("x")
    cache = ManifestCache()
    files = build_manifest(src, [src], cache=cache)
    assert [f.entry.path for f in files] == ["top.bin", "a/b/deep.txt"]
    top = next(f.entry for f in files if f.entry.path == "top.bin")
    assert top.mode == 0o751 and top.size == 5000
    assert top.mtime_ns == os.stat(src / "top.bin").st_mtime_ns
    # a cache hit returns the same hashes without reading; a change invalidates it
    calls = []
    real = mf.hash_file
    mf.hash_file = lambda *a, **k: calls.append(a) or real(*a, **k)  # type: ignore[assignment]
    try:
        again = build_manifest(src, [src], cache=cache)
        assert calls == []
        assert [f.entry for f in again] == [f.entry for f in files]
        (src / "top.bin").write_bytes(os.urandom(5000))
        changed = build_manifest(src, [src / "top.bin"], cache=cache)
        assert len(calls) == 1 and changed[0].entry.root != top.root
    finally:
        mf.hash_file = real  # type: ignore[assignment]


def test_single_file_at_root_is_named_by_its_name(tmp_path: Path) -> None:
    p = tmp_path / "one.txt"
    p.write_text("x")
    assert build_manifest(p, [p])[0].entry.path == "one.txt"
    assert build_manifest(tmp_path, [p])[0].entry.path == "one.txt"


def _entry(path: str = "f", data: bytes = b"hello") -> FileEntry:
    chunk = 1 << 20
    hashes = b"".join(mf.hash_chunk(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return FileEntry(path, len(data), 0o644, 123, chunk, hashes, mf.root_hash(hashes, len(data)))


def test_offer_round_trip_and_contradictions() -> None:
    e = _entry()
    offer = Offer(b"t" * 16, 0, True, (e.to_wire(),))
    back = decode(offer.encode(), TO_SINK)
    assert isinstance(back, Offer) and back.files() == [e]
    bad_root = [*e.to_wire()[:6], b"\0" * 32]
    with pytest.raises(ProtocolError, match="contradicts"):
        decode(Offer(b"t" * 16, 0, True, (bad_root,)).encode(), TO_SINK)
    bad_path = ["../x", *e.to_wire()[1:]]
    with pytest.raises(ProtocolError):
        decode(Offer(b"t" * 16, 0, True, (bad_path,)).encode(), TO_SINK)
    too_many_chunks = ["f", 10 << 30, 0o644, 0, 64 << 10, b"", b"\0" * 32]
    with pytest.raises(ProtocolError, match="chunks"):
        decode(Offer(b"t" * 16, 0, True, (too_many_chunks,)).encode(), TO_SINK)
    odd_chunk = ["f", 5, 0o644, 0, 100_000, e.chunk_hashes, e.root]
    with pytest.raises(ProtocolError, match="chunk size"):
        decode(Offer(b"t" * 16, 0, True, (odd_chunk,)).encode(), TO_SINK)
    negative = ["f", -1, 0o644, 0, 1 << 20, b"", e.root]
    with pytest.raises(ProtocolError):
        decode(Offer(b"t" * 16, 0, True, (negative,)).encode(), TO_SINK)


def test_messages_are_direction_checked_and_bounded() -> None:
    with pytest.raises(ProtocolError, match="unexpected"):
        decode(ChunkData(0, 0, b"x").encode(), TO_SOURCE)
    with pytest.raises(ProtocolError):
        decode(packb(["xfer.data", 1, 0, 0, b"\0" * ((4 << 20) + 1)]), TO_SINK)
    with pytest.raises(ProtocolError):
        decode(packb(["xfer.status", 1, 0, 7, 0, ""]), TO_SOURCE)


def test_offer_batches_fit_one_frame() -> None:
    big = FileEntry("big", 64 << 30, 0o644, 0, 1 << 20, b"\1" * 32 * 65536, b"\2" * 32)
    entries = [big, big, *[_entry(f"f{i}") for i in range(MAX_FILES_PER_OFFER + 10)]]
    batches = offer_batches(b"t" * 16, entries)
    assert [b.seq for b in batches] == list(range(len(batches)))
    assert [b.last for b in batches] == [False] * (len(batches) - 1) + [True]
    assert sum(len(b.entries) for b in batches) == len(entries)
    assert all(len(b.encode()) < MAX_FRAME_BYTES for b in batches)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_crashes_on_garbage(data: bytes) -> None:
    try:
        decode(data, TO_SINK)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.binary(max_size=40),
                          st.text(max_size=20), st.none(), st.booleans(),
                          st.lists(st.integers(0, 1 << 40), max_size=8)),
                max_size=8))
def test_offer_decoder_rejects_malformed_entries(fields: list[object]) -> None:
    try:
        decode(packb(["xfer.offer", 1, b"t" * 16, 0, True, [fields]]), TO_SINK)
    except ProtocolError:
        pass
    try:
        decode(packb(["xfer.status", 1, *fields]), TO_SOURCE)
    except ProtocolError:
        pass
    assert FileStatus(0, 0, 0, "").encode()


def test_node_state_files_are_never_sent(tmp_path: Path) -> None:
    src = tmp_path / "out"
    src.mkdir()
    for name in ("identity.key", "trust.db", "events.db-wal", "node.log.1", "notes.txt"):
        (src / name).write_bytes(b"x")
    files = mf.build_manifest(tmp_path, [src])
    assert [f.entry.path for f in files] == ["out/notes.txt"]


def test_a_rewrite_with_the_mtime_put_back_is_hashed_again(tmp_path: Path) -> None:
    f = tmp_path / "offered.bin"
    f.write_bytes(b"a" * 4096)
    st = os.stat(f)
    cache = ManifestCache()
    before = cache.get_or_hash(f, st)
    time.sleep(0.01)  # ctime has (at least) the file system's timestamp granularity
    f.write_bytes(b"b" * 4096)  # same size, same inode ...
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the mtime put back
    after = cache.get_or_hash(f, os.stat(f))
    assert after[2] != before[2]  # the new bytes were hashed, not the cached old ones
