"""ReceiveStore's partial files on a real disk: resume state saved in the background."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node.errors import LocalIOError
from node.transfer import store as store_mod
from node.transfer.manifest import FileEntry, hash_file
from node.transfer.store import PartialFile, ReceiveStore

CHUNK = 64 << 10
CHUNKS = 8


def entry_for(path: Path) -> FileEntry:
    chunk, hashes, root = hash_file(path, chunk_size=CHUNK)
    return FileEntry("f.bin", os.path.getsize(path), 0o644, 0, chunk, hashes, root)


def chunks_in_state(partial: PartialFile) -> set[int]:
    raw = store_mod.unpackb(partial.state_path.read_bytes())
    bitmap = raw[4]
    return {i for i in range(CHUNKS) if bitmap[i >> 3] & (1 << (i & 7))}


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: Any) -> tuple[ReceiveStore, Path, FileEntry, bytes]:
    data = os.urandom(CHUNK * CHUNKS)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store = ReceiveStore(tmp_path / "received")
    folder = store.folder("alice")
    monkeypatch.setattr(store_mod, "STATE_SAVE_EVERY_CHUNKS", 2)
    monkeypatch.setattr(store_mod, "STATE_SAVE_INTERVAL_S", 1000.0)
    return store, folder, entry_for(src), data


def part(data: bytes, i: int) -> bytes:
    return data[i * CHUNK:(i + 1) * CHUNK]


def test_chunk_writes_go_on_during_a_slow_state_save(setup: Any, monkeypatch: Any) -> None:
    store, folder, entry, data = setup
    gate = threading.Event()
    entered = threading.Event()
    real_sync = os.fdatasync

    def slow_sync(fd: int) -> None:
        if threading.current_thread().name == "p2pfs-state" and not gate.is_set():
            entered.set()
            gate.wait(10)
        real_sync(fd)

    monkeypatch.setattr(store_mod.os, "fdatasync", slow_sync)
    plan = store.plan(folder, entry)
    partial = plan.partial
    assert partial is not None
    try:
        assert partial.write_chunk(0, part(data, 0)) and partial.write_chunk(1, part(data, 1))
        assert entered.wait(5)  # the background save of {0, 1} is stuck in fdatasync
        t0 = time.monotonic()
        for i in (2, 3, 4):
            assert partial.write_chunk(i, part(data, i))
        assert time.monotonic() - t0 < 5  # did not wait for the save
        assert not partial.state_path.exists()
        gate.set()
        partial._join_saver()
        # the snapshot was taken before the fdatasync: it lists only what that covered
        assert chunks_in_state(partial) == {0, 1}
    finally:
        gate.set()
        store.release(partial)  # joins the saver, then saves everything written
    assert chunks_in_state(partial) == {0, 1, 2, 3, 4}
    again = store.plan(folder, entry)
    try:
        assert again.missing == [5, 6, 7]
    finally:
        assert again.partial is not None
        store.release(again.partial)


def test_a_failed_background_save_fails_the_next_write(setup: Any, monkeypatch: Any) -> None:
    store, folder, entry, data = setup
    real_sync = os.fdatasync

    def full(fd: int) -> None:
        if threading.current_thread().name == "p2pfs-state":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_sync(fd)

    monkeypatch.setattr(store_mod.os, "fdatasync", full)
    plan = store.plan(folder, entry)
    partial = plan.partial
    assert partial is not None
    try:
        partial.write_chunk(0, part(data, 0))
        partial.write_chunk(1, part(data, 1))
        partial._join_saver()
        with pytest.raises(LocalIOError, match="disk full"):
            partial.write_chunk(2, part(data, 2))
    finally:
        store.release(partial)


def test_finished_file_leaves_no_state_behind(setup: Any) -> None:
    store, folder, entry, data = setup
    plan = store.plan(folder, entry)
    partial = plan.partial
    assert partial is not None
    try:
        for i in range(CHUNKS):
            assert partial.write_chunk(i, memoryview(part(data, i)))
        final = partial.finalize()
    finally:
        store.release(partial)
    assert final.read_bytes() == data
    assert sorted(os.listdir(folder)) == ["f.bin"]


@pytest.mark.parametrize("sender_mode,umask,expected", [
    (0o777, 0o022, 0o755),     # a sender's 0777 never lands group/world writable
    (0o4777, 0o022, 0o755),    # never setuid ...
    (0o7775, 0o002, 0o755),    # ... setgid or sticky; group write stripped even at umask 002
    (0o640, 0o022, 0o640),
    (0o777, 0o077, 0o700),     # the receiver's umask applies
    (0o444, 0o022, 0o644),     # we always keep our own copy readable and writable
])
def test_received_file_mode_is_masked(tmp_path: Path, sender_mode: int, umask: int,
                                      expected: int) -> None:
    data = os.urandom(CHUNK * 2)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    chunk, hashes, root = hash_file(src, chunk_size=CHUNK)
    entry = FileEntry("f.bin", len(data), sender_mode, 0, chunk, hashes, root)
    store = ReceiveStore(tmp_path / "received", umask=umask)
    plan = store.plan(store.folder("alice"), entry)
    partial = plan.partial
    assert partial is not None
    try:
        for i in range(2):
            assert partial.write_chunk(i, part(data, i))
        final = partial.finalize()
    finally:
        store.release(partial)
    assert stat.S_IMODE(os.lstat(final).st_mode) == expected


def test_store_reads_the_process_umask() -> None:
    old = os.umask(0o027)
    try:
        assert store_mod.current_umask() == 0o027
        assert ReceiveStore(Path("unused")).umask == 0o027
    finally:
        os.umask(old)


def _small_partials(store: ReceiveStore, folder: Path, tmp_path: Path, n: int
                    ) -> tuple[list[PartialFile], dict[str, bytes]]:
    partials, files = [], {}
    for i in range(n):
        data = os.urandom(100 + i)
        src = tmp_path / f"s{i}"
        src.write_bytes(data)
        chunk, hashes, root = hash_file(src, chunk_size=CHUNK)
        e = FileEntry(f"d/f{i}.bin", len(data), 0o644, 1_600_000_000 * 10**9, chunk, hashes,
                      root)
        partial = store.plan(folder, e).partial
        assert partial is not None and partial.write_chunk(0, data)
        partials.append(partial)
        files[f"f{i}.bin"] = data
    return partials, files


@pytest.mark.parametrize("have_syncfs", [True, False])
def test_commit_batch_syncs_once_then_renames_and_reports_a_blocked_name(
        tmp_path: Path, monkeypatch: Any, have_syncfs: bool) -> None:
    store = ReceiveStore(tmp_path / "received")
    folder = store.folder("alice")
    syncs: list[int] = []
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def fake_syncfs(fd: int) -> bool:
        syncs.append(fd)
        # nothing is under its final name before the sync
        assert sorted(n for n in os.listdir(folder / "d") if not n.startswith(".")) == [
            "f3.bin"]
        return have_syncfs

    monkeypatch.setattr(store_mod, "_syncfs", fake_syncfs)
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    partials, files = _small_partials(store, folder, tmp_path, 5)
    (folder / "d" / "f3.bin").mkdir()  # a folder is in the way of one file
    try:
        out = store.commit_batch(partials)
    finally:
        for p in partials:
            store.release(p)
    assert len(syncs) == 1
    # without syncfs each file is fsynced; with it only the folder is (once)
    assert len(fsyncs) == (1 if have_syncfs else 5 + 1)
    assert isinstance(out[3], store_mod.PathBlocked)
    for i in (0, 1, 2, 4):
        assert out[i] == folder / "d" / f"f{i}.bin"
        assert out[i].read_bytes() == files[f"f{i}.bin"]
        assert out[i].stat().st_mtime_ns == 1_600_000_000 * 10**9
    names = sorted(os.listdir(folder / "d"))
    assert [n for n in names if not n.startswith(".")] == ["f0.bin", "f1.bin", "f2.bin",
                                                          "f3.bin", "f4.bin"]


def test_commit_batch_that_cannot_sync_shows_nothing_and_keeps_resume_state(
        tmp_path: Path, monkeypatch: Any) -> None:
    store = ReceiveStore(tmp_path / "received")
    folder = store.folder("alice")

    def failing_syncfs(fd: int) -> bool:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_mod, "_syncfs", failing_syncfs)
    partials, _files = _small_partials(store, folder, tmp_path, 3)
    try:
        with pytest.raises(LocalIOError, match="cannot sync"):
            store.commit_batch(partials)
    finally:
        for p in partials:
            store.release(p)
    names = os.listdir(folder / "d")
    assert all(n.startswith(".") for n in names)  # partials and their state only
    assert sum(n.endswith(".p2pfs-state") for n in names) == 3  # a retry resumes them


# -- big files' chunks written with O_DIRECT ------------------------------------------

def _big_entry(tmp_path: Path) -> tuple[FileEntry, bytes]:
    # not a multiple of the alignment: the last chunk has a tail written through the cache
    data = os.urandom(store_mod.DIRECT_IO_MIN_FILE_BYTES + 3 * CHUNK + 1234)
    src = tmp_path / "big-src.bin"
    src.write_bytes(data)
    return entry_for(src), data


def _write_all(partial: PartialFile, entry: FileEntry, data: bytes) -> None:
    for i in reversed(range(entry.chunks)):  # any order: each chunk at its own offset
        assert partial.write_chunk(i, memoryview(data)[i * CHUNK:(i + 1) * CHUNK])


def _direct_or_skip(partial: PartialFile) -> None:
    if partial._dfd < 0:
        pytest.skip("this file system refuses O_DIRECT: the buffered path is the one in use")


def test_big_file_chunks_go_through_o_direct_and_arrive_intact(tmp_path: Path) -> None:
    store = ReceiveStore(tmp_path / "received")
    entry, data = _big_entry(tmp_path)
    plan = store.plan(store.folder("alice"), entry)
    partial = plan.partial
    assert partial is not None
    try:
        _direct_or_skip(partial)
        _write_all(partial, entry, data)
        final = partial.finalize()
    finally:
        store.release(partial)
    assert final.read_bytes() == data
    assert partial._dfd == -1 and partial._bounce is None  # closed with the file


def test_big_file_falls_back_to_the_page_cache_when_o_direct_is_refused(
        tmp_path: Path, monkeypatch: Any) -> None:
    store = ReceiveStore(tmp_path / "received")
    entry, data = _big_entry(tmp_path)
    plan = store.plan(store.folder("alice"), entry)
    partial = plan.partial
    assert partial is not None
    real = store._write_at
    refused: list[int] = []

    def no_direct(fd: int, buf: Any, offset: int) -> None:
        if fd == partial._dfd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, buf, offset)

    monkeypatch.setattr(store, "_write_at", no_direct)
    try:
        _direct_or_skip(partial)
        _write_all(partial, entry, data)
        assert partial._dfd == -1 and len(refused) == 1  # given up after the first refusal
        final = partial.finalize()
    finally:
        store.release(partial)
    assert final.read_bytes() == data


def test_a_full_disk_on_a_direct_write_is_a_local_io_error(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    store = ReceiveStore(tmp_path / "received")
    entry, data = _big_entry(tmp_path)
    plan = store.plan(store.folder("alice"), entry)
    partial = plan.partial
    assert partial is not None

    def full(fd: int, buf: Any, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        _direct_or_skip(partial)
        monkeypatch.setattr(store, "_write_at", full)
        with pytest.raises(LocalIOError, match="cannot write"):
            partial.write_chunk(0, data[:CHUNK])
        assert partial.missing()[0] == 0  # nothing counted
    finally:
        store.release(partial)


def test_direct_io_off_writes_big_files_through_the_page_cache(tmp_path: Path) -> None:
    store = ReceiveStore(tmp_path / "received", direct_io=False)
    entry, data = _big_entry(tmp_path)
    plan = store.plan(store.folder("alice"), entry)
    partial = plan.partial
    assert partial is not None
    try:
        assert partial._dfd == -1
        _write_all(partial, entry, data)
        final = partial.finalize()
    finally:
        store.release(partial)
    assert final.read_bytes() == data


def test_direct_written_chunks_are_verified_and_kept_on_resume(tmp_path: Path) -> None:
    store = ReceiveStore(tmp_path / "received")
    entry, data = _big_entry(tmp_path)
    folder = store.folder("alice")
    first = store.plan(folder, entry).partial
    assert first is not None
    half = entry.chunks // 2
    try:
        _direct_or_skip(first)
        for i in range(half):
            assert first.write_chunk(i, data[i * CHUNK:(i + 1) * CHUNK])
        first.save_state()
    finally:
        store.release(first)
    again = store.plan(folder, entry).partial
    assert again is not None
    try:
        assert again.missing() == list(range(half, entry.chunks))  # re-read from disk, verified
        for i in again.missing():
            assert again.write_chunk(i, data[i * CHUNK:(i + 1) * CHUNK])
        final = again.finalize()
    finally:
        store.release(again)
    assert final.read_bytes() == data
