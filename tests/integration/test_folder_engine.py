"""The folder driver (node/folders/engine.py) on real folders and SQLite, several devices in
one process: channels are in-memory pairs, a fetch copies the file the serving engine
resolves (what the transfer layer does over the network, minus the network)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from node.errors import P2PError, PeerUnreachable
from node.folders import engine as engine_mod
from node.folders.config import FolderConfig, FolderMode, FolderStore
from node.folders.engine import FolderSync
from node.folders.ignore import IGNORE_FILE_NAME, MARKER_FILE_NAME
from node.identity import Identity, PeerId
from node.memory_channel import channel_pair
from node.notifications import FolderConflict, FolderLocallyChanged, FolderOffered

DEADLINE_S = 10.0


async def wait_until(cond: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Device:
    def __init__(self, net: Net, name: str, tmp: Path) -> None:
        self.net = net
        self.name = name
        self.identity = Identity.generate(name)
        self.home = tmp / f"home-{name}"
        self.home.mkdir()
        self.dir = tmp / f"dir-{name}"
        self.dir.mkdir()
        self.store = FolderStore.load(self.home)
        self.notes: list[object] = []
        self.online = True
        self.engine: FolderSync | None = None

    @property
    def peer(self) -> PeerId:
        return self.identity.peer_id

    def add_folder(self, folder_id: str, peers: list[Device], **kw: object) -> None:
        self.store.put(FolderConfig(folder_id, self.dir.resolve(),
                                    tuple(p.peer for p in peers), **kw))  # type: ignore[arg-type]
        self.store.save()

    async def start(self) -> None:
        self.online = True
        self.engine = FolderSync(self.identity, self.store, self.home,
                                 open_channel=self._open, fetch=self._fetch,
                                 is_trusted=lambda p: p in self.net.by_peer,
                                 notify=self.notes.append)
        await self.engine.start()

    async def stop(self) -> None:
        self.online = False
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    async def _open(self, peer: PeerId) -> object:
        other = self.net.by_peer.get(peer)
        if other is None or not other.online or other.engine is None or not self.online:
            raise PeerUnreachable(f"{peer.short} is offline")
        mine, theirs = channel_pair(self.peer, peer)
        # each end's .peer is who it talks to
        mine.peer, theirs.peer = peer, self.peer
        asyncio.ensure_future(other.engine.handle_channel(theirs))
        return mine

    async def _fetch(self, peer: PeerId, paths: list[str], staging: Path, seeds: list[Path]
                     ) -> dict[str, Path | P2PError]:
        self.net.seeds.append(seeds)
        other = self.net.by_peer[peer]
        out: dict[str, Path | P2PError] = {}
        for path in paths:
            if not other.online or other.engine is None:
                out[path] = PeerUnreachable("offline")
                continue
            hit = other.engine.resolve_fetch(self.peer, path)
            if hit is None:
                out[path] = P2PError(f"no such file: {path}")
                continue
            dest = staging / os.urandom(6).hex()
            shutil.copyfile(hit[1], dest)
            self.net.fetched.append((self.name, other.name, path))
            out[path] = dest
        return out

    def tree(self) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for dirpath, dirnames, filenames in os.walk(self.dir):
            dirnames[:] = [d for d in dirnames if d != ".p2pfs-versions"]
            for d in dirnames:
                p = Path(dirpath) / d
                out[p.relative_to(self.dir).as_posix() + "/"] = (
                    "->" + os.readlink(p) if p.is_symlink() else "dir")
            for f in filenames:
                p = Path(dirpath) / f
                rel = p.relative_to(self.dir).as_posix()
                if rel in (IGNORE_FILE_NAME, MARKER_FILE_NAME):
                    continue
                out[rel] = "->" + os.readlink(p) if p.is_symlink() else p.read_bytes()
        return out

    def versions(self) -> list[bytes]:
        vroot = self.dir / ".p2pfs-versions"
        out = []
        for dirpath, dirnames, filenames in os.walk(vroot):
            dirnames[:] = [d for d in dirnames if d != ".incoming"]
            out += [(Path(dirpath) / f).read_bytes() for f in filenames]
        return out


class Net:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.devices: list[Device] = []
        self.by_peer: dict[PeerId, Device] = {}
        self.fetched: list[tuple[str, str, str]] = []
        self.seeds: list[list[Path]] = []

    def add(self, name: str) -> Device:
        d = Device(self, name, self.tmp)
        self.devices.append(d)
        self.by_peer[d.peer] = d
        return d


@pytest.fixture(autouse=True)
def fast_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "ANTI_ENTROPY_S", 0.5)
    monkeypatch.setattr(engine_mod, "TICK_S", 0.05)
    monkeypatch.setattr(engine_mod, "CONNECT_BACKOFF_S", 0.1)
    monkeypatch.setattr(engine_mod, "CONNECT_BACKOFF_MAX_S", 0.2)
    monkeypatch.setattr(engine_mod, "RETRY_BACKOFF_S", 0.1)
    monkeypatch.setattr(engine_mod, "RETRY_BACKOFF_MAX_S", 0.3)


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    n = Net(tmp_path)
    yield n
    for d in n.devices:
        await d.stop()


async def pair(net: Net, *, mode_b: FolderMode = FolderMode.SEND_RECEIVE
               ) -> tuple[Device, Device]:
    a, b = net.add("a"), net.add("b")
    a.add_folder("docs", [b])
    b.add_folder("docs", [a], mode=mode_b)
    await a.start()
    await b.start()
    return a, b


async def test_edits_flow_both_ways_and_deletes_keep_a_version(net: Net) -> None:
    a, b = await pair(net)
    (a.dir / "sub").mkdir()
    (a.dir / "sub" / "one.txt").write_bytes(b"from a")
    await wait_until(lambda: b.tree().get("sub/one.txt") == b"from a", "a's file on b")
    (b.dir / "sub" / "one.txt").write_bytes(b"edited on b")
    await wait_until(lambda: a.tree().get("sub/one.txt") == b"edited on b", "b's edit on a")
    assert [a.dir / "sub" / "one.txt"] in net.seeds  # the old version, for chunk reuse
    assert b"from a" in a.versions()
    (a.dir / "sub" / "one.txt").unlink()
    await wait_until(lambda: "sub/one.txt" not in b.tree(), "the deletion on b")
    assert b"edited on b" in b.versions()
    assert a.tree() == b.tree() == {"sub/": "dir"}


async def test_renames_move_no_content_over_the_network(net: Net) -> None:
    a, b = await pair(net)
    (a.dir / "d").mkdir()
    (a.dir / "d" / "big.bin").write_bytes(b"x" * 100_000)
    await wait_until(lambda: "d/big.bin" in b.tree(), "big.bin on b")
    fetched = len(net.fetched)
    os.rename(a.dir / "d", a.dir / "e")  # a directory rename: delete d/*, create e/*
    await wait_until(lambda: b.tree() == {"e/": "dir", "e/big.bin": b"x" * 100_000},
                     "the renamed folder on b")
    assert len(net.fetched) == fetched  # copied from the old name, not fetched


async def test_empty_dirs_symlinks_and_modes(net: Net) -> None:
    a, b = await pair(net)
    (a.dir / "empty").mkdir()
    (a.dir / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(a.dir / "run.sh", 0o755)
    os.symlink("run.sh", a.dir / "link")
    os.symlink("/etc/passwd", a.dir / "escape")
    await wait_until(lambda: "link/" in b.tree() or "link" in b.tree(), "the symlink on b")
    await wait_until(lambda: "empty/" in b.tree() and "run.sh" in b.tree(), "dir and file")
    assert os.readlink(b.dir / "link") == "run.sh"
    assert not os.path.lexists(b.dir / "escape")  # a target outside the folder: skipped
    assert os.stat(b.dir / "run.sh").st_mode & 0o100
    (a.dir / "empty").rmdir()
    await wait_until(lambda: "empty/" not in b.tree(), "the empty dir removed on b")


async def test_concurrent_edits_keep_both_versions(net: Net) -> None:
    a, b = await pair(net)
    (a.dir / "notes.txt").write_bytes(b"base")
    await wait_until(lambda: b.tree().get("notes.txt") == b"base", "base on b")
    await b.stop()
    (b.dir / "notes.txt").write_bytes(b"b's offline edit")
    os.utime(b.dir / "notes.txt", (1_600_000_000, 1_600_000_000))  # older: b loses
    (a.dir / "notes.txt").write_bytes(b"a's edit")
    await asyncio.sleep(0.3)  # a scans its edit before b returns
    await b.start()

    def converged() -> bool:
        ta, tb = a.tree(), b.tree()
        return ta == tb and len(ta) == 2
    await wait_until(converged, "both trees with the winner and one conflict copy")
    tree = a.tree()
    assert tree["notes.txt"] == b"a's edit"
    (copy,) = [n for n in tree if ".sync-conflict-" in n]
    assert tree[copy] == b"b's offline edit"
    assert copy.startswith("notes.sync-conflict-20200913-") and copy.endswith(".txt")
    assert any(isinstance(n, FolderConflict) for n in b.notes)


async def test_ignore_patterns_on_both_sides(net: Net) -> None:
    a, b = net.add("a"), net.add("b")
    a.add_folder("docs", [b])
    b.add_folder("docs", [a])
    (b.dir / IGNORE_FILE_NAME).write_text("*.log\n")
    (a.dir / IGNORE_FILE_NAME).write_text("secret/\n")
    await a.start()
    await b.start()
    (a.dir / "app.log").write_bytes(b"a log")
    (a.dir / "keep.txt").write_bytes(b"keep")
    (b.dir / "secret").mkdir()
    (b.dir / "secret" / "key").write_bytes(b"k")
    assert a.engine is not None and b.engine is not None
    ra, rb = a.engine.runners["docs"], b.engine.runners["docs"]
    await wait_until(lambda: b.tree().get("keep.txt") == b"keep", "keep.txt on b")
    # each side has heard of the other's file (and planned since): neither applies it
    await wait_until(lambda: "app.log" in rb.db.remotes().get(a.peer.key, {}), "app.log heard")
    await wait_until(lambda: "secret/key" in ra.db.remotes().get(b.peer.key, {}),
                     "secret/key heard")
    await rb._sync_once()  # a sync round after hearing of them
    await ra._sync_once()
    assert "app.log" not in b.tree()  # ignored where it would land
    # b's secret/ is not ignored on b, so it is announced; a ignores it where it lands
    assert "secret/key" not in a.tree()
    assert (a.dir / IGNORE_FILE_NAME).read_text() == "secret/\n"  # never synced


async def test_receive_only_local_edit_reported_then_reverted(net: Net) -> None:
    a, b = await pair(net, mode_b=FolderMode.RECEIVE_ONLY)
    (a.dir / "f.txt").write_bytes(b"global")
    await wait_until(lambda: b.tree().get("f.txt") == b"global", "f.txt on b")
    (b.dir / "f.txt").write_bytes(b"local edit")
    assert b.engine is not None and a.engine is not None
    cfg_b = b.store.require("docs")
    await wait_until(lambda: b.engine.status(cfg_b).locally_changed == 1,  # type: ignore
                     "the local edit reported")
    assert b.engine.status(cfg_b).locally_changed_names == ("f.txt",)
    (note,) = [n for n in b.notes if isinstance(n, FolderLocallyChanged)]
    assert note.folder == "docs" and note.paths == ("f.txt",) and note.count == 1
    await asyncio.sleep(0.3)
    assert a.tree()["f.txt"] == b"global"  # never sent
    assert await b.engine.revert("docs") == 1
    await wait_until(lambda: b.tree().get("f.txt") == b"global", "the global version back")
    assert b"local edit" in b.versions()
    assert b.engine.status(cfg_b).locally_changed == 0


async def test_send_only_records_remote_edits_and_override_pushes_ours(net: Net) -> None:
    a, b = net.add("a"), net.add("b")
    a.add_folder("docs", [b], mode=FolderMode.SEND_ONLY)
    b.add_folder("docs", [a])
    await a.start()
    await b.start()
    (a.dir / "f.txt").write_bytes(b"ours")
    await wait_until(lambda: b.tree().get("f.txt") == b"ours", "f.txt on b")
    (b.dir / "f.txt").write_bytes(b"b edits")
    assert a.engine is not None
    cfg_a = a.store.require("docs")
    await wait_until(lambda: a.engine.status(cfg_a).locally_changed == 1,  # type: ignore
                     "a records b's version as out of sync")
    assert a.tree()["f.txt"] == b"ours"
    assert await a.engine.override("docs") == 1
    await wait_until(lambda: b.tree().get("f.txt") == b"ours", "ours pushed back over b's")
    assert b"b edits" in b.versions()


async def test_fetch_from_another_device_when_the_origin_is_offline(net: Net) -> None:
    a, b, c = net.add("a"), net.add("b"), net.add("c")
    for d in (a, b, c):
        d.add_folder("docs", [x for x in (a, b, c) if x is not d])
    await a.start()
    await c.start()
    (a.dir / "f.txt").write_bytes(b"made on a")
    await wait_until(lambda: c.tree().get("f.txt") == b"made on a", "f.txt on c")
    await a.stop()
    await b.start()
    await wait_until(lambda: b.tree().get("f.txt") == b"made on a", "f.txt on b, via c")
    assert ("b", "c", ".folders/docs/f.txt") in net.fetched


async def test_unknown_folder_from_a_trusted_peer_is_offered_never_synced(net: Net) -> None:
    a, b = net.add("a"), net.add("b")
    a.add_folder("photos", [b], label="Family \x1b[2J photos")
    await a.start()
    await b.start()
    (a.dir / "p.jpg").write_bytes(b"jpeg")
    await wait_until(lambda: any(isinstance(n, FolderOffered) and n.folder_id == "photos"
                                 for n in b.notes), "folder_offered on b")
    assert b.tree() == {}
    (offer,) = [n for n in b.notes if isinstance(n, FolderOffered)]
    assert offer.label == "Family \x1b[2J photos"  # the offering device's label...
    assert "'Family ?[2J photos'" in offer.render()  # ...shown without its escapes


async def test_a_folder_added_again_elsewhere_deletes_nothing(net: Net, tmp_path: Path) -> None:
    a, b = await pair(net)
    (a.dir / "keep.txt").write_bytes(b"keep")
    await wait_until(lambda: b.tree().get("keep.txt") == b"keep", "keep.txt on b")
    await b.stop()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    b.store.update("docs", path=elsewhere.resolve())
    b.store.save()
    b.dir = elsewhere
    await b.start()
    await wait_until(lambda: b.tree().get("keep.txt") == b"keep", "keep.txt fetched again")
    assert a.tree()["keep.txt"] == b"keep"


async def test_a_change_recorded_but_never_announced_goes_out_next_round(net: Net) -> None:
    # as after a kill -9 between recording a version and announcing it
    from node.folders import disk

    a, b = await pair(net)
    assert a.engine is not None
    runner = a.engine.runners["docs"]
    await b.stop()
    (a.dir / "quiet.txt").write_bytes(b"recorded, not announced")
    changes, _clock = disk.scan(a.dir, runner.db.local(), runner.ignore, device=runner.me,
                                clock=runner.db.meta("clock") + 100)
    for info in changes:
        runner.db.put_local(info)  # what a round records before it announces
    await a.stop()
    await a.start()
    await b.start()
    await wait_until(lambda: b.tree().get("quiet.txt") == b"recorded, not announced",
                     "the recorded change on b")


@pytest.mark.parametrize("how", ["emptied", "gone"])
async def test_an_unmounted_folder_announces_no_deletions_and_syncs_again_when_back(
        net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    from node.folders.status import FolderState

    monkeypatch.setattr(engine_mod, "ABSENT_RECHECK_S", 0.05)
    a, b = await pair(net)
    for i in range(3):
        (a.dir / f"f{i}.txt").write_bytes(b"kept %d" % i)
    await wait_until(lambda: len(b.tree()) == 3, "the files on b")
    assert (b.dir / MARKER_FILE_NAME).is_file() and (a.dir / MARKER_FILE_NAME).is_file()
    assert a.engine is not None and b.engine is not None
    rb = b.engine.runners["docs"]
    away = tmp_path / "unmounted"
    os.rename(b.dir, away)  # the disk goes...
    if how == "emptied":
        b.dir.mkdir()  # ...and the mount point is an empty directory
    want = "folder marker missing" if how == "emptied" else "folder path missing"
    await wait_until(lambda: rb.state is FolderState.ERROR and want in rb.last_error,
                     f"b's folder in error: {want}")
    with pytest.raises(P2PError, match=want):
        await rb.scan_now()  # `node folder rescan` says so too
    checks = 0
    real = rb.missing

    def counted() -> str:
        nonlocal checks
        checks += 1
        return real()
    monkeypatch.setattr(rb, "missing", counted)
    await wait_until(lambda: checks >= 3, "b looked at its folder again, still missing")
    # nothing deleted anywhere: not in b's index, not announced, not on a
    assert not any(i.deleted for i in rb.db.local().values())
    ra = a.engine.runners["docs"]
    assert not any(i.deleted for i in ra.db.remote_index(b.peer.key).values())
    assert sorted(n for n in a.tree() if n.startswith("f")) == ["f0.txt", "f1.txt", "f2.txt"]
    cfg_b = b.store.require("docs")
    assert b.engine.status(cfg_b).state is FolderState.ERROR
    if how == "emptied":
        b.dir.rmdir()
    os.rename(away, b.dir)  # mounted again
    (a.dir / "after.txt").write_bytes(b"made while b's disk was away")
    await wait_until(lambda: b.tree().get("after.txt") == b"made while b's disk was away",
                     "b syncs again once its folder is back")
    assert b.engine.status(cfg_b).state is not FolderState.ERROR and not rb.last_error
    (b.dir / "from-b.txt").write_bytes(b"b's watcher works again")
    await wait_until(lambda: a.tree().get("from-b.txt") == b"b's watcher works again",
                     "an edit on b after the remount reaches a")
    assert len([n for n in a.tree() if n.startswith("f")]) == 4


async def test_a_folder_indexed_before_markers_gets_one_and_syncs(net: Net) -> None:
    from node.folders.db import FolderDB

    a, b = await pair(net)
    (a.dir / "old.txt").write_bytes(b"indexed before markers existed")
    await wait_until(lambda: b.tree().get("old.txt") == b"indexed before markers existed",
                     "old.txt on b")
    await b.stop()
    (b.dir / MARKER_FILE_NAME).unlink()
    db = FolderDB(b.home / "folder-docs.db")
    db.set_meta("marker", 0)  # as an index made by a node without markers
    db.close()
    await b.start()
    await wait_until(lambda: (b.dir / MARKER_FILE_NAME).is_file(), "the marker made")
    (a.dir / "new.txt").write_bytes(b"new")
    await wait_until(lambda: b.tree().get("new.txt") == b"new", "b still syncs")
    assert b.tree().get("old.txt") == b"indexed before markers existed"


async def test_a_folder_indexed_before_markers_on_an_unmounted_disk_stays_untouched(
        net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first start after the upgrade that brought markers, with the disk unmounted
    (an empty mount point): no marker is written there and no file is announced deleted."""
    from node.folders.db import FolderDB
    from node.folders.status import FolderState

    monkeypatch.setattr(engine_mod, "ABSENT_RECHECK_S", 0.05)
    a, b = await pair(net)
    for i in range(3):
        (a.dir / f"f{i}.txt").write_bytes(b"kept %d" % i)
    await wait_until(lambda: len(b.tree()) == 3, "the files on b")
    await b.stop()
    (b.dir / MARKER_FILE_NAME).unlink()
    db = FolderDB(b.home / "folder-docs.db")
    db.set_meta("marker", 0)  # as an index made by a node without markers
    db.close()
    away = tmp_path / "unmounted"
    os.rename(b.dir, away)
    b.dir.mkdir()  # the mount point, empty
    await b.start()
    assert b.engine is not None and a.engine is not None
    rb = b.engine.runners["docs"]
    await wait_until(lambda: rb.state is FolderState.ERROR and "looks empty" in rb.last_error,
                     "b's folder in error")
    assert not (b.dir / MARKER_FILE_NAME).exists()
    assert not any(i.deleted for i in rb.db.local().values())
    ra = a.engine.runners["docs"]
    assert not any(i.deleted for i in ra.db.remote_index(b.peer.key).values())
    assert sorted(n for n in a.tree() if n.startswith("f")) == ["f0.txt", "f1.txt", "f2.txt"]


async def test_a_touch_or_a_chmod_syncs_both_ways_without_fetching_content(net: Net) -> None:
    import stat as stat_mod

    a, b = await pair(net)
    (a.dir / "f.txt").write_bytes(b"same bytes throughout")
    await wait_until(lambda: b.tree().get("f.txt") == b"same bytes throughout", "f.txt on b")
    fetched = len(net.fetched)
    os.utime(a.dir / "f.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    await wait_until(lambda: os.stat(b.dir / "f.txt").st_mtime_ns == 1_600_000_000_123_456_789,
                     "a's touch on b")
    later = 1_700_000_000_000_000_000
    os.utime(b.dir / "f.txt", ns=(later, later))  # and back the other way
    await wait_until(lambda: os.stat(a.dir / "f.txt").st_mtime_ns == later, "b's touch on a")
    os.chmod(a.dir / "f.txt", 0o6777)  # setuid, setgid, world-writable: masked on b
    await wait_until(lambda: os.stat(b.dir / "f.txt").st_mode & 0o100, "the x bit on b")
    mode_b = stat_mod.S_IMODE(os.stat(b.dir / "f.txt").st_mode)
    assert mode_b & 0o7022 == 0, oct(mode_b)  # never group/world write, setuid/gid, sticky
    assert len(net.fetched) == fetched  # metadata only: no content moved
    assert a.tree() == b.tree()
    # settled: the masked mode on b is no change to make or announce, round after round
    assert a.engine is not None and b.engine is not None
    rb = b.engine.runners["docs"]
    seq = rb.db.meta("seq")
    for _ in range(3):
        await rb._sync_once()
    assert rb.db.meta("seq") == seq
    assert stat_mod.S_IMODE(os.stat(b.dir / "f.txt").st_mode) == mode_b


async def test_a_trusted_device_announcing_too_many_files_is_capped_and_stays_connected(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake peer (a trusted device of the folder, no engine of its own) floods b."""
    import blake3

    from node.folders.model import FileInfo, FileKind
    from node.folders.protocol import Changes, FolderChange, Hello
    from node.folders.vector import Vector, device_key
    from node.wire import decode_message

    cap = 10
    monkeypatch.setattr(engine_mod, "MAX_INDEX_ENTRIES_PER_DEVICE", cap)
    a, b = net.add("a"), net.add("b")
    b.add_folder("docs", [a])
    await b.start()
    assert b.engine is not None
    rb = b.engine.runners["docs"]
    mine, theirs = channel_pair(a.peer, b.peer)
    mine.peer, theirs.peer = b.peer, a.peer
    served = asyncio.ensure_future(b.engine.handle_channel(theirs))
    dev = device_key(a.peer)

    def change(seq: int, name: str) -> bytes:
        info = FileInfo(name, FileKind.FILE, 1, 1_000_000_000, 0o644,
                        blake3.blake3(b"%d" % seq).digest(), False, Vector.of([(dev, seq)]),
                        b"", dev)
        return FolderChange.create(a.identity, folder="docs", seq=seq, wall_ms=1,
                                   info=info).encoded

    await mine.send(Hello(("docs",)).encode())
    await mine.send(Changes("docs", a.peer.key, 8, 0, False,
                            tuple(change(s, f"f{s}") for s in range(1, 9))).encode())
    await mine.send(Changes("docs", a.peer.key, 16, 8, False,
                            tuple(change(s, f"f{s}") for s in range(9, 17))).encode())
    await mine.send(Changes("docs", a.peer.key, 17, 16, True, (change(17, "f1"),)).encode())
    await wait_until(lambda: rb.db.remote_seq(a.peer.key, "f1") == 17,
                     "a known name's change is still taken past the cap")
    assert len(rb.db.remote_index(a.peer.key)) == cap
    assert rb.db.mark(a.peer.key) == 16  # what was refused is not asked for again
    assert f"announces more than {cap}" in b.engine.status(b.store.require("docs")).last_error
    assert "6 of its entries refused" in rb.index_error
    # the channel is alive: a file made on b now is announced to the fake peer
    (b.dir / "after.txt").write_bytes(b"made on b after the flood")
    while True:
        msg = decode_message(await asyncio.wait_for(mine.recv(), DEADLINE_S))
        if isinstance(msg, Changes) and msg.origin == b.peer.key:
            break
    assert [FolderChange.decode(c).info.name for c in msg.changes] == ["after.txt"]
    assert not served.done()
    await mine.close()
    await asyncio.wait_for(served, DEADLINE_S)


async def test_a_peer_fetches_only_regular_files_of_an_agreed_folder_through_no_symlink(
        net: Net, tmp_path: Path) -> None:
    a, b = await pair(net)
    (a.dir / "sub").mkdir()
    (a.dir / "sub" / "ok.txt").write_bytes(b"ok")
    (a.dir / "top.txt").write_bytes(b"top")
    (a.dir / "x.swp").write_bytes(b"ignored")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    os.symlink(outside, a.dir / "via")  # a directory symlink leading out
    os.symlink("top.txt", a.dir / "link.txt")
    await wait_until(lambda: b.tree().get("sub/ok.txt") == b"ok", "a's files on b")
    assert a.engine is not None
    hit = a.engine.resolve_fetch(b.peer, ".folders/docs/sub/ok.txt")
    assert hit is not None and hit[1].read_bytes() == b"ok"
    assert hit[1] == hit[0] / ".folders" / "docs" / "sub" / "ok.txt"
    stranger = Identity.generate("stranger").peer_id
    for peer, rel in ((b.peer, ".folders/docs/via/secret.txt"),  # through a symlink
                      (b.peer, ".folders/docs/link.txt"),  # a symlink itself
                      (b.peer, ".folders/docs/sub"),  # a directory
                      (b.peer, ".folders/docs/x.swp"),  # ignored
                      (b.peer, ".folders/docs/missing.txt"),
                      (b.peer, ".folders/docs/sub/../top.txt"),  # not a clean name
                      (b.peer, ".folders/other/top.txt"),  # not an agreed folder
                      (b.peer, "docs/top.txt"),  # not a folder fetch
                      (stranger, ".folders/docs/top.txt")):  # not a device of it
        assert a.engine.resolve_fetch(peer, rel) is None, rel
