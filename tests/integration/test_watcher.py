"""FolderWatcher on a real temp dir: debounced create/modify/delete/move, scan, suppression."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import blake3

from node.watcher import (
    FolderWatcher,
    LocalChange,
    hash_file,
    is_ignored_name,
    shareable_files,
)

DEBOUNCE_S = 0.1


class Recorder:
    def __init__(self) -> None:
        self.changes: list[LocalChange] = []
        self._event = asyncio.Event()

    async def __call__(self, change: LocalChange) -> None:
        self.changes.append(change)
        self._event.set()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[LocalChange]:
        async def _wait() -> None:
            while len(self.changes) < n:
                self._event.clear()
                await self._event.wait()
        await asyncio.wait_for(_wait(), timeout)
        return self.changes

    async def quiet(self, seconds: float = DEBOUNCE_S * 4) -> None:
        await asyncio.sleep(seconds)


def make(tmp_path: Path, rec: Recorder) -> tuple[Path, FolderWatcher]:
    folder = tmp_path / "share"
    folder.mkdir(exist_ok=True)
    w = FolderWatcher(folder, "share", index_path=tmp_path / "idx.p2pfs-index",
                      on_change=rec, debounce_s=DEBOUNCE_S)
    return folder, w


async def test_create_burst_modify_delete(tmp_path: Path) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    await w.start()
    try:
        f = folder / "sub" / "a.txt"
        f.parent.mkdir()
        with open(f, "wb") as fh:  # a burst of writes -> one event
            for _ in range(20):
                fh.write(b"x" * 1000)
                fh.flush()
                await asyncio.sleep(0.005)
        (await rec.wait_for(1))
        await rec.quiet()
        assert len(rec.changes) == 1
        c = rec.changes[0]
        assert (c.kind, c.path, c.size) == ("created", "sub/a.txt", 20000)
        assert c.hash == blake3.blake3(b"x" * 20000).digest()

        f.write_bytes(b"new content")
        (await rec.wait_for(2))
        assert rec.changes[1].kind == "modified"
        assert rec.changes[1].hash == blake3.blake3(b"new content").digest()

        os.utime(f)  # touch: same content, no event
        f.write_bytes(b"new content")  # rewrite of identical bytes: no event
        await rec.quiet()
        assert len(rec.changes) == 2

        f.unlink()
        (await rec.wait_for(3))
        assert (rec.changes[2].kind, rec.changes[2].path) == ("deleted", "sub/a.txt")
    finally:
        await w.stop()


async def test_move_and_ignored_files(tmp_path: Path) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    (folder / "old.txt").write_bytes(b"hello")
    await w.start()  # scan at start reports it
    try:
        assert [c.kind for c in rec.changes] == ["created"]
        (folder / "x.p2pfs-part").write_bytes(b"partial")
        (folder / ".notes.txt.swp").write_bytes(b"vim")
        (folder / "backup~").write_bytes(b"emacs")
        (folder / ".p2pfs-versions").mkdir()
        (folder / ".p2pfs-versions" / "v1").write_bytes(b"old")
        os.rename(folder / "old.txt", folder / "new.txt")
        (await rec.wait_for(2))
        await rec.quiet()
        assert len(rec.changes) == 2
        c = rec.changes[1]
        assert (c.kind, c.path, c.old_path) == ("moved", "new.txt", "old.txt")
        # editor-style save: write a temp file, rename it over the target -> modified
        (folder / "new.txt.tmp").write_bytes(b"hello, edited")
        os.replace(folder / "new.txt.tmp", folder / "new.txt")
        (await rec.wait_for(3))
        await rec.quiet()
        assert [(c.kind, c.path) for c in rec.changes[2:]] == [("modified", "new.txt")]
    finally:
        await w.stop()


async def test_scan_at_start_finds_offline_changes(tmp_path: Path) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    for name, data in [("keep", b"1"), ("edit", b"2"), ("gone", b"3"), ("ren", b"44")]:
        (folder / name).write_bytes(data)
    await w.start()
    await w.stop()
    assert len(rec.changes) == 4
    # while the node is stopped
    (folder / "edit").write_bytes(b"2 edited")
    (folder / "gone").unlink()
    os.rename(folder / "ren", folder / "renamed")
    (folder / "fresh").write_bytes(b"5")
    rec2 = Recorder()
    _, w2 = make(tmp_path, rec2)
    changes = await w2.start()
    try:
        got = sorted((c.kind, c.path, c.old_path) for c in changes)
        assert got == [("created", "fresh", ""), ("deleted", "gone", ""),
                       ("modified", "edit", ""), ("moved", "renamed", "ren")]
        assert sorted(rec2.changes, key=lambda c: c.path) == sorted(changes,
                                                                     key=lambda c: c.path)
    finally:
        await w2.stop()


async def test_suppressed_sync_writes_do_not_echo(tmp_path: Path) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    await w.start()
    try:
        target = folder / "from-peer.bin"
        data = b"synced content"
        w.suppress(target, blake3.blake3(data).digest())
        target.write_bytes(data)
        await rec.quiet(DEBOUNCE_S * 6)
        assert rec.changes == []
        assert w.index.get("from-peer.bin") is not None  # indexed, just not announced
        assert w.find_by_hash(blake3.blake3(data).digest()) == target
        # the user editing it afterwards is announced as usual
        target.write_bytes(b"user edit")
        await rec.wait_for(1)
        assert rec.changes[0].kind == "modified"
        w.suppress(target, b"")
        target.unlink()
        await rec.quiet(DEBOUNCE_S * 6)
        assert len(rec.changes) == 1
    finally:
        await w.stop()


def test_ignore_rules_and_hash(tmp_path: Path) -> None:
    for name in ["a.p2pfs-part", ".#lock", "x.swp", "x~", "d/.p2pfs-versions/f", "4913"]:
        assert is_ignored_name(name)
    for name in ["a.txt", "dir/b", "p2pfs-part"]:
        assert not is_ignored_name(name)
    p = tmp_path / "f"
    p.write_bytes(b"abc" * 1000)
    size, _mtime, digest = hash_file(p)
    assert size == 3000 and digest == blake3.blake3(b"abc" * 1000).digest()


async def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    from node.errors import LocalIOError

    w = FolderWatcher(tmp_path / "nope", "nope", index_path=tmp_path / "i.p2pfs-index",
                      on_change=Recorder())
    with pytest.raises(LocalIOError, match="does not exist"):
        await w.start()
    w.index.close()


# -- the node's own state, symlinks and unannounceable names -------------------------------

BAD_UTF8 = b"caf\xe9.txt"  # Latin-1 bytes: not valid UTF-8
NEWLINE_NAME = "bad\nINFO p2pfs.daemon: forged.txt"


def _make_bad_names(folder: Path) -> None:
    fd = os.open(os.fsencode(folder) + b"/" + BAD_UTF8, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"latin-1 name")
    os.close(fd)
    (folder / NEWLINE_NAME).write_bytes(b"newline name")
    (folder / "tab\there.txt").write_bytes(b"tab name")


async def test_bad_names_are_skipped_with_one_warning_and_the_rest_announced(
        tmp_path: Path, caplog: Any) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    _make_bad_names(folder)
    (folder / "a-good.txt").write_bytes(b"a")
    (folder / "z-good.txt").write_bytes(b"z")
    caplog.set_level(logging.WARNING, logger="node.watcher")
    await w.start()
    try:
        assert sorted(c.path for c in rec.changes) == ["a-good.txt", "z-good.txt"]
        warned = [r.getMessage() for r in caplog.records if "not announcing" in r.getMessage()]
        assert len(warned) == 3, warned
        # live writes to the same bad names: still skipped, no second warning
        (folder / NEWLINE_NAME).write_bytes(b"edited")
        (folder / "m-good.txt").write_bytes(b"m")
        await rec.wait_for(3)
        await rec.quiet()
        assert [c.path for c in rec.changes[2:]] == ["m-good.txt"]
        assert len([r for r in caplog.records if "not announcing" in r.getMessage()]) == 3
    finally:
        await w.stop()


async def test_symlinks_are_never_announced_with_their_target(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    secret_hash = blake3.blake3(secret.read_bytes()).digest()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "inner.txt").write_bytes(secret.read_bytes())
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    (folder / "passwd").symlink_to(secret)
    (folder / "dirlink").symlink_to(outside)
    await w.start()
    try:
        (folder / "live-link").symlink_to(secret)
        os.symlink(secret, folder / "tmp-link")
        os.replace(folder / "tmp-link", folder / "renamed-link")
        (folder / "proof.txt").write_bytes(b"proof")
        await rec.wait_for(1)
        await rec.quiet()
        assert [c.path for c in rec.changes] == ["proof.txt"]
        assert all(c.hash != secret_hash for c in rec.changes)
    finally:
        await w.stop()


async def test_node_state_files_are_never_announced(tmp_path: Path) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    for name in ("identity.key", "trust.db", "trust.db-wal", "node.log", "daemon.json"):
        (folder / name).write_bytes(b"state")
    (folder / "sub").mkdir()
    (folder / "sub" / "identity.key").write_bytes(b"someone's key")
    (folder / "readme.txt").write_bytes(b"hello")
    await w.start()
    try:
        (folder / "events.db").write_bytes(b"written while running")
        (folder / "proof.txt").write_bytes(b"proof")
        await rec.wait_for(2)
        await rec.quiet()
        assert sorted(c.path for c in rec.changes) == ["proof.txt", "readme.txt"]
    finally:
        await w.stop()


def test_hash_file_refuses_symlinks_and_fifos(tmp_path: Path) -> None:
    import pytest

    target = tmp_path / "t"
    target.write_bytes(b"x")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(OSError):
            hash_file(tmp_path / name)


def test_shareable_files_skips_links_state_and_bad_names(tmp_path: Path, caplog: Any) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "good.txt").write_bytes(b"g")
    (out / "sub" / "deep.txt").write_bytes(b"d")
    (out / "identity.key").write_bytes(b"k")
    (out / "link").symlink_to(tmp_path / "out" / "good.txt")
    (out / "dirlink").symlink_to(tmp_path)
    _make_bad_names(out)
    caplog.set_level(logging.WARNING, logger="node.watcher")
    got = shareable_files(out, 1000)
    assert [rel for _f, rel in got] == ["out/good.txt", "out/sub/deep.txt"]
    assert shareable_files(out / "good.txt", 1000) == [(out / "good.txt", "good.txt")]
    assert len(shareable_files(out, 1)) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any("identity.key" in m for m in lines) and any("symlink" in m for m in lines)


def test_find_by_hash_never_returns_a_symlink(tmp_path: Path) -> None:
    rec = Recorder()
    folder, w = make(tmp_path, rec)
    secret = tmp_path / "secret"
    secret.write_bytes(b"same bytes")
    digest = blake3.blake3(b"same bytes").digest()
    try:
        (folder / "swapped").symlink_to(secret)  # an indexed file replaced by a link
        w.index.put("swapped", 10, 0, digest)
        assert w.find_by_hash(digest) is None
        (folder / "real").write_bytes(b"same bytes")
        w.index.put("real", 10, 0, digest)
        assert w.find_by_hash(digest) == folder / "real"
    finally:
        w.index.close()


async def test_2000_files_dropped_at_once_become_a_few_batches(tmp_path: Path) -> None:
    folder = tmp_path / "share"
    staging = tmp_path / "staging"
    folder.mkdir()
    staging.mkdir()
    singles = Recorder()
    batches: list[list[LocalChange]] = []
    got = asyncio.Event()

    async def on_changes(changes: list[LocalChange]) -> None:
        batches.append(changes)
        if sum(map(len, batches)) >= 2000:
            got.set()

    w = FolderWatcher(folder, "share", index_path=tmp_path / "idx.p2pfs-index",
                      on_change=singles, on_changes=on_changes, debounce_s=DEBOUNCE_S)
    await w.start()
    try:
        for i in range(2000):
            (staging / f"f{i:04d}.bin").write_bytes(i.to_bytes(4, "big") * 8)
        for i in range(2000):  # one rename each, as a drop into the folder
            os.rename(staging / f"f{i:04d}.bin", folder / f"f{i:04d}.bin")
        await asyncio.wait_for(got.wait(), 30)
        changes = [c for b in batches for c in b]
        assert sorted(c.path for c in changes) == [f"f{i:04d}.bin" for i in range(2000)]
        assert {c.kind for c in changes} == {"created"}
        assert all(c.hash == blake3.blake3(int(c.path[1:5]).to_bytes(4, "big") * 8).digest()
                   for c in changes)
        assert len(batches) <= 20, [len(b) for b in batches]  # not 2,000 separate calls
        assert max(map(len, batches)) <= 1000  # and each batch is bounded
        assert singles.changes == []
        assert len(w.index.all()) == 2000
    finally:
        await w.stop()


async def test_p2pfsignore_hides_names_and_rescans_when_edited(tmp_path: Path) -> None:
    from node.folders.ignore import IGNORE_FILE_NAME, IgnoreRules

    rec = Recorder()
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / IGNORE_FILE_NAME).write_text("*.log\nbuild/\n")
    (folder / "build").mkdir()
    (folder / "build" / "out.o").write_bytes(b"obj")
    (folder / "a.log").write_bytes(b"log")
    (folder / "keep.txt").write_bytes(b"keep")
    ticks = iter(range(0, 10**9, 10))
    rules = IgnoreRules(folder, clock=lambda: float(next(ticks)))  # re-checked at every call
    w = FolderWatcher(folder, "share", index_path=tmp_path / "idx.p2pfs-index",
                      on_change=rec, debounce_s=DEBOUNCE_S, ignore=rules)
    await w.start()
    try:
        assert [(c.kind, c.path) for c in rec.changes] == [("created", "keep.txt")]
        (folder / "b.log").write_bytes(b"more")
        (folder / "build" / "x.o").write_bytes(b"obj2")
        (folder / "keep.txt").write_bytes(b"edited")
        await rec.wait_for(2)
        await rec.quiet()
        assert [(c.kind, c.path) for c in rec.changes[1:]] == [("modified", "keep.txt")]
        # un-ignore the logs, ignore keep.txt: the logs appear, keep.txt is not "deleted"
        (folder / IGNORE_FILE_NAME).write_text("build/\nkeep.txt\n")
        await rec.wait_for(4)
        await rec.quiet()
        assert sorted((c.kind, c.path) for c in rec.changes[2:]) == [
            ("created", "a.log"), ("created", "b.log")]
    finally:
        await w.stop()
