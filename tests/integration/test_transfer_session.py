"""Transfers end to end over an in-memory channel pair with real files in temp dirs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest

from node.errors import (
    ChannelClosed,
    IntegrityError,
    LocalIOError,
    P2PError,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
)
from node.memory_channel import MemoryChannel, memory_channel_pair
from node.transfer import session as sess
from node.transfer.manifest import build_manifest
from node.transfer.paths import is_internal_name
from node.transfer.protocol import (
    TO_SOURCE,
    ChunkData,
    Offer,
    decode,
)
from node.transfer.session import (
    TransferProgress,
    TransferState,
    fetch_file,
    receive_files,
    send_files,
    serve_fetch,
)
from node.transfer.store import ReceiveStore

MiB = 1 << 20
TID = b"T" * 16


def make_tree(src: Path) -> dict[str, bytes]:
    files = {
        "big.bin": os.urandom(5 * MiB + 4321),
        "docs/readme.txt": b"hello world\n",
        "docs/deep/er/x.dat": os.urandom(70_000),
        "empty": b"",
    }
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.chmod(src / "docs/readme.txt", 0o600)
    os.chmod(src / "big.bin", 0o755)
    os.utime(src / "big.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return files


def visible_files(folder: Path) -> dict[str, bytes]:
    """What a user listing received files sees (internal names skipped)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_internal_name(d)]
        for name in filenames:
            if not is_internal_name(name):
                p = Path(dirpath) / name
                out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


async def run_pair(source: Any, sink: Any, channels: tuple[Any, Any] | None = None,
                   ) -> tuple[Any, Any]:
    """Run both sides; return (result or exception) for each.

    With `channels`, each side closes its end when it finishes, as the daemon does.
    """
    async def side(coro: Any, ch: Any) -> Any:
        try:
            return await coro
        finally:
            if ch is not None:
                await ch.close()

    a, b = channels if channels is not None else (None, None)
    res = await asyncio.gather(side(source, a), side(sink, b), return_exceptions=True)
    return res[0], res[1]


class Tap:
    """Wrap a channel end; `on_recv(data) -> data` may alter or act on incoming messages."""

    def __init__(self, inner: MemoryChannel, on_recv: Any) -> None:
        self.inner = inner
        self.on_recv = on_recv
        self.peer = inner.peer
        self.peer_name = inner.peer_name
        self.transport = inner.transport

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes:
        data = await self.inner.recv()
        out = self.on_recv(data)
        if asyncio.iscoroutine(out):
            out = await out
        return out

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(autouse=True)
def every_progress(monkeypatch: Any) -> None:
    monkeypatch.setattr(sess, "PROGRESS_INTERVAL_S", 0.0)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    return src, tmp_path / "received"


async def test_directory_arrives_identical_with_mode_and_mtime(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    files = make_tree(src)
    a, b = memory_channel_pair("alice", "bob")
    seen: list[TransferProgress] = []
    r_src, r_sink = await run_pair(send_files(a, src, [src]),
                                   receive_files(b, ReceiveStore(recv), progress=seen.append))
    assert r_src.state == TransferState.DONE and r_sink.state == TransferState.DONE
    assert r_src.transfer_id == r_sink.transfer_id
    folder = recv / "alice"
    assert visible_files(folder) == files
    assert os.listdir(folder / "docs") == ["readme.txt", "deep"] or \
        sorted(os.listdir(folder / "docs")) == ["deep", "readme.txt"]  # no partial leftovers
    for rel in files:
        s, d = os.stat(src / rel), os.stat(folder / rel)
        assert (s.st_mode & 0o777, s.st_mtime_ns) == (d.st_mode & 0o777, d.st_mtime_ns)
    assert r_sink.bytes_received_payload == sum(map(len, files.values()))
    assert {f.rel_path for f in r_sink.files} == set(files)
    assert seen[-1].state == "done" and seen[-1].bytes_done == seen[-1].bytes_total
    assert seen[-1].files_done == 4 and seen[-1].peer == "alice"

    # same content again: nothing moves
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src / "big.bin"]),
                                   receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE and r_sink.bytes_received_payload == 0
    assert r_src.bytes_sent_on_wire < 2000


async def test_resume_after_link_drop_moves_fewer_bytes(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    data = os.urandom(12 * MiB)
    (src / "f.bin").write_bytes(data)
    a, b = memory_channel_pair("alice", "bob")
    got = 0

    async def drop_after_some(msg: bytes) -> bytes:
        nonlocal got
        got += 1
        if got == 7:  # offer + 6 chunks accepted, then the link dies
            await b.close()
        return msg

    r_src, r_sink = await run_pair(send_files(a, src, [src]),
                                   receive_files(Tap(b, drop_after_some), ReceiveStore(recv)))
    assert isinstance(r_sink, ChannelClosed), r_sink
    assert isinstance(r_src, ChannelClosed), r_src
    assert not (recv / "alice" / "f.bin").exists()
    assert visible_files(recv / "alice") == {}

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert 0 < r_sink.bytes_received_payload <= len(data) - 6 * MiB
    assert r_src.bytes_sent_on_wire < len(data) - 5 * MiB
    assert (recv / "alice" / "f.bin").read_bytes() == data
    assert sorted(os.listdir(recv / "alice")) == ["f.bin"]


async def test_resume_after_sink_task_cancelled(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    data = os.urandom(10 * MiB)
    (src / "f.bin").write_bytes(data)
    a, b = memory_channel_pair("alice", "bob")
    count = 0

    def kill_sink_midway(msg: bytes) -> bytes:
        nonlocal count
        count += 1
        if count == 6:
            sink.cancel()  # the receiver dies mid-transfer
        return msg

    sink = asyncio.ensure_future(receive_files(Tap(b, kill_sink_midway), ReceiveStore(recv)))
    source = asyncio.ensure_future(send_files(a, src, [src]))
    with pytest.raises(asyncio.CancelledError):
        await sink
    await b.close()
    with pytest.raises(ChannelClosed):
        await source

    a, b = memory_channel_pair("alice", "bob")
    _r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert r_sink.bytes_received_payload <= len(data) - 3 * MiB
    assert (recv / "alice" / "f.bin").read_bytes() == data


async def _stale_sink(src: Path, store: ReceiveStore, peer: object, data: bytes) -> Any:
    """A sink left holding f.bin by a sender that died mid-transfer without closing the
    channel (a sender killed over udp or quic looks like this until the idle timeout)."""
    (src / "f.bin").write_bytes(data)
    a, b = memory_channel_pair("alice", "bob", peer_a=peer)
    count = 0
    stalled = asyncio.Event()

    def stall_midway(msg: bytes) -> bytes:
        nonlocal count
        count += 1
        if count == 7:  # the offer and 6 chunks arrived
            stalled.set()
        return msg

    sink = asyncio.ensure_future(receive_files(Tap(b, stall_midway), store))
    source = asyncio.ensure_future(send_files(a, src, [src]))
    await asyncio.wait_for(stalled.wait(), 10)
    source.cancel()  # the sender process is gone; its channel is never closed
    with pytest.raises(asyncio.CancelledError):
        await source
    await asyncio.sleep(0.05)  # the sink settles the chunks it already got
    assert not sink.done()
    return sink


async def test_new_session_from_the_same_peer_supersedes_a_stale_one(
        dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    data = os.urandom(12 * MiB)
    store = ReceiveStore(recv)
    stale = await _stale_sink(src, store, "alice-key", data)

    a, b = memory_channel_pair("alice", "bob", peer_a="alice-key")
    r_src, r_sink = await asyncio.wait_for(
        run_pair(send_files(a, src, [src]), receive_files(b, store), (a, b)), 20)
    assert r_sink.state == TransferState.DONE, r_sink
    assert r_src.state == TransferState.DONE, r_src
    assert (recv / "alice" / "f.bin").read_bytes() == data
    # the verified chunks of the stale session were kept and not fetched again
    assert r_sink.bytes_received_payload <= len(data) - 3 * MiB
    with pytest.raises(sess.Superseded, match="superseded"):
        await stale


async def test_superseded_sender_still_alive_is_told_and_gives_up(
        dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    data = os.urandom(12 * MiB)
    (src / "f.bin").write_bytes(data)
    store = ReceiveStore(recv)
    got = asyncio.Event()

    async def slowly(msg: bytes) -> bytes:
        got.set()
        await asyncio.sleep(0.05)  # a slow link: the first transfer is still running
        return msg

    a1, b1 = memory_channel_pair("alice", "bob", peer_a="alice-key")
    first = asyncio.ensure_future(
        run_pair(send_files(a1, src, [src]), receive_files(Tap(b1, slowly), store), (a1, b1)))
    await asyncio.wait_for(got.wait(), 10)
    await asyncio.sleep(0.3)  # a few chunks in
    a2, b2 = memory_channel_pair("alice", "bob", peer_a="alice-key")
    r_src, r_sink = await asyncio.wait_for(
        run_pair(send_files(a2, src, [src]), receive_files(b2, store), (a2, b2)), 20)
    assert r_sink.state == TransferState.DONE, r_sink
    old_src, old_sink = await asyncio.wait_for(first, 10)
    assert isinstance(old_sink, sess.Superseded), old_sink
    # the old sender learns why, and RemoteError is not retried by the daemon
    assert isinstance(old_src, RemoteError) and "superseded" in str(old_src), old_src
    assert (recv / "alice" / "f.bin").read_bytes() == data


async def test_another_peer_cannot_supersede_a_session(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    store = ReceiveStore(recv)
    stale = await _stale_sink(src, store, "alice-key", os.urandom(12 * MiB))
    try:
        # same folder label, another authenticated key: refused as before
        a, b = memory_channel_pair("alice", "bob", peer_a="mallory-key")
        _r_src, r_sink = await asyncio.wait_for(
            run_pair(send_files(a, src, [src]), receive_files(b, store), (a, b)), 20)
        assert r_sink.state == TransferState.FAILED
        assert "already being received" in (r_sink.error or "")
        assert not stale.done()
    finally:
        stale.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stale


def flip_chunk(index_filter: Any) -> Any:
    """A recv hook that flips one byte of every ChunkData whose chunk matches the filter."""
    def hook(data: bytes) -> bytes:
        try:
            msg = decode(data, (ChunkData, Offer))
        except P2PError:
            return data
        if isinstance(msg, ChunkData) and index_filter(msg.chunk):
            bad = bytearray(msg.data)
            bad[len(bad) // 2] ^= 0x40
            return ChunkData(msg.index, msg.chunk, bytes(bad)).encode()
        return data
    return hook


async def test_corrupt_chunk_is_refetched_and_healed(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    data = os.urandom(4 * MiB + 99)
    (src / "f.bin").write_bytes(data)
    flipped: list[int] = []

    def once(chunk: int) -> bool:
        if chunk == 2 and not flipped:
            flipped.append(chunk)
            return True
        return False

    a, b = memory_channel_pair("alice", "bob")
    _r_src, r_sink = await run_pair(send_files(a, src, [src]),
                                   receive_files(Tap(b, flip_chunk(once)), ReceiveStore(recv)))
    assert flipped == [2]
    assert r_sink.state == TransferState.DONE
    assert r_sink.bytes_received_payload == len(data) + MiB  # chunk 2 came twice
    assert (recv / "alice" / "f.bin").read_bytes() == data


async def test_repeated_corruption_aborts_with_integrity_error(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (src / "f.bin").write_bytes(os.urandom(3 * MiB))
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(
        send_files(a, src, [src]),
        receive_files(Tap(b, flip_chunk(lambda c: c == 1)), ReceiveStore(recv)))
    assert isinstance(r_sink, IntegrityError) and "3 times" in str(r_sink)
    assert isinstance(r_src, RemoteError) and "failed verification" in str(r_src)
    assert r_src.code == "IntegrityError"  # type: ignore[attr-defined]
    assert visible_files(recv / "alice") == {}


async def fake_source(ch: MemoryChannel, entries: list[list[Any]], then: Any = None) -> list[Any]:
    """Send a raw offer, then run `then(ch)`; collect what the sink says until it closes."""
    await ch.send(Offer(TID, 0, True, tuple(entries)).encode())
    if then is not None:
        await then(ch)
    said = []
    try:
        while True:
            said.append(decode(await ch.recv(), TO_SOURCE))
            if type(said[-1]).__name__ == "Abort":
                break
    except P2PError as exc:
        said.append(exc)
    return said


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs/escape.txt", "a/../../escape.txt",
                                 "CON", "sub/nul.txt", "x" * 300, "a\\..\\escape.txt",
                                 "ok/\x00.txt", ".p2pfs-versions/x"])
async def test_hostile_paths_in_offer_are_rejected(dirs: tuple[Path, Path], bad: str) -> None:
    src, recv = dirs
    p = src / "ok.txt"
    p.write_bytes(b"payload")
    entry = build_manifest(src, [p])[0].entry.to_wire()
    entry[0] = bad
    a, b = memory_channel_pair("alice", "bob")
    said, r_sink = await run_pair(fake_source(a, [entry]), receive_files(b, ReceiveStore(recv)))
    await b.close()
    assert isinstance(r_sink, ProtocolError)
    assert isinstance(said[-1], RemoteError) or any(
        type(m).__name__ == "Abort" for m in said)
    written = [p for p in dirs[1].parent.rglob("*") if p.is_file() and "src" not in p.parts]
    assert written == []


async def test_symlink_in_received_dir_is_not_followed(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    outside = recv.parent / "outside"
    outside.mkdir()
    (recv / "alice").mkdir(parents=True)
    os.symlink(outside, recv / "alice" / "docs")
    os.symlink(outside / "victim", recv / "alice" / "top.txt")
    (src / "docs").mkdir()
    (src / "docs" / "a.txt").write_text("a")
    (src / "top.txt").write_text("top")
    (src / "fine.txt").write_text("fine")
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.FAILED and r_src.state == TransferState.FAILED
    assert {p for p, _ in r_sink.failures} == {"docs/a.txt", "top.txt"}
    assert "symlink" in (r_src.error or "")
    assert list(outside.iterdir()) == []
    assert (recv / "alice" / "fine.txt").read_text() == "fine"


async def test_unrequested_chunk_cuts_the_source_off(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (src / "f.bin").write_bytes(os.urandom(2 * MiB))
    sf = build_manifest(src, [src / "f.bin"])[0]

    async def push_chunk(ch: MemoryChannel) -> None:
        first = ChunkData(0, 0, (src / "f.bin").read_bytes()[:MiB]).encode()
        await ch.send(first)  # requested: fine
        await ch.send(first)  # the same chunk again: nobody asked for it

    a, b = memory_channel_pair("alice", "bob")
    said, r_sink = await run_pair(fake_source(a, [sf.entry.to_wire()], push_chunk),
                                  receive_files(b, ReceiveStore(recv)))
    await b.close()
    assert isinstance(r_sink, ProtocolError) and "not asked for" in str(r_sink)
    abort = [m for m in said if type(m).__name__ == "Abort"]
    assert abort and abort[0].code == "ProtocolError"
    assert visible_files(recv / "alice") == {}


async def test_contradicting_offers_are_refused(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (src / "a").write_text("x")
    e = build_manifest(src, [src / "a"])[0].entry.to_wire()
    below = ["a/b", *e[1:]]
    for entries in ([e, e], [e, below]):
        a, b = memory_channel_pair("alice", "bob")
        _said, r_sink = await run_pair(fake_source(a, entries),
                                       receive_files(b, ReceiveStore(recv)))
        await b.close()
        assert isinstance(r_sink, ProtocolError), r_sink
    a, b = memory_channel_pair("alice", "bob")

    async def second_offer(ch: MemoryChannel) -> None:
        await ch.send(Offer(TID, 5, True, ()).encode())

    await a.send(Offer(TID, 0, False, (e,)).encode())
    _said, r_sink = await run_pair(fake_source(a, [], second_offer),
                                  receive_files(b, ReceiveStore(recv)))
    await b.close()
    assert isinstance(r_sink, ProtocolError)


class FullDiskStore(ReceiveStore):
    def __init__(self, root: Path, fail_after: int) -> None:
        super().__init__(root)
        self.writes = 0
        self.fail_after = fail_after

    def _write_at(self, fd: int, data: bytes, offset: int) -> None:
        self.writes += 1
        if self.writes > self.fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write_at(fd, data, offset)


async def test_disk_full_reports_and_a_retry_resumes(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    data = os.urandom(6 * MiB)
    (src / "f.bin").write_bytes(data)
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]),
                                   receive_files(b, FullDiskStore(recv, fail_after=3)))
    assert isinstance(r_sink, LocalIOError) and "disk full" in str(r_sink)
    assert isinstance(r_src, RemoteError) and "disk full" in str(r_src)
    assert visible_files(recv / "alice") == {}
    assert any(n.endswith(".p2pfs-part") for n in os.listdir(recv / "alice"))

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert r_sink.bytes_received_payload == len(data) - 3 * MiB
    assert (recv / "alice" / "f.bin").read_bytes() == data


async def test_unwritable_received_dir(dirs: tuple[Path, Path]) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits: emulate EACCES at the write instead
        class Denied(ReceiveStore):
            def _write_at(self, fd: int, data: bytes, offset: int) -> None:
                raise PermissionError(errno.EACCES, "Permission denied")
        store: ReceiveStore = Denied(dirs[1])
    else:
        dirs[1].mkdir()
        os.chmod(dirs[1], 0o500)
        store = ReceiveStore(dirs[1])
    src = dirs[0]
    (src / "f.bin").write_bytes(b"z" * 1000)
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, store))
    assert isinstance(r_sink, LocalIOError) and "permission denied" in str(r_sink)
    assert isinstance(r_src, RemoteError)


async def test_same_name_different_content_keeps_old_version(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (recv / "alice" / "docs").mkdir(parents=True)
    (recv / "alice" / "docs" / "r.txt").write_text("old content")
    (src / "docs").mkdir()
    (src / "docs" / "r.txt").write_text("new content!")
    a, b = memory_channel_pair("alice", "bob")
    _r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert (recv / "alice" / "docs" / "r.txt").read_text() == "new content!"
    versions = list((recv / "alice" / ".p2pfs-versions" / "docs").iterdir())
    assert len(versions) == 1 and versions[0].name.startswith("r.txt.")
    assert versions[0].read_text() == "old content"


async def test_file_changed_while_sending(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    p = src / "f.bin"
    p.write_bytes(os.urandom(6 * MiB))
    changed = False

    def mutate(progress: TransferProgress) -> None:
        nonlocal changed
        if progress.bytes_done >= MiB and not changed:
            changed = True
            with open(p, "r+b") as f:
                f.seek(5 * MiB)
                f.write(b"tampered")

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src], progress=mutate),
                                   receive_files(b, ReceiveStore(recv)), (a, b))
    assert changed
    assert isinstance(r_src, IntegrityError) and "changed while being sent" in str(r_src)
    assert (isinstance(r_sink, RemoteError) and "changed while being sent" in str(r_sink)) or \
        isinstance(r_sink, ChannelClosed), r_sink
    assert visible_files(recv / "alice") == {}


async def test_file_changed_in_place_with_mtime_kept(dirs: tuple[Path, Path]) -> None:
    """Same size, mtime put back: the sender's fstat check still sees the write (ctime)."""
    src, recv = dirs
    p = src / "f.bin"
    p.write_bytes(os.urandom(6 * MiB))
    st = os.stat(p)
    changed = False

    def mutate(progress: TransferProgress) -> None:
        nonlocal changed
        if progress.bytes_done >= MiB and not changed:
            changed = True
            with open(p, "r+b") as f:
                f.seek(5 * MiB + 10)
                f.write(b"tampered")
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src], progress=mutate),
                                   receive_files(b, ReceiveStore(recv)), (a, b))
    assert changed and os.stat(p).st_mtime_ns == st.st_mtime_ns
    assert isinstance(r_src, IntegrityError) and "changed while being sent" in str(r_src)
    assert isinstance(r_sink, RemoteError) and "changed while being sent" in str(r_sink)
    assert visible_files(recv / "alice") == {}


async def test_file_changed_before_the_transfer_behind_a_stale_manifest(
        dirs: tuple[Path, Path]) -> None:
    """The sender does not re-hash what it reads. A change no stat can show (made before
    the transfer, mtime put back, on a file system whose ctime did not move either, so
    the manifest comes from the cache) is caught by the sink; its re-request makes the
    sender hash that chunk and report the change, rather than the sink failing the
    chunk three times."""
    from node.transfer.manifest import DEFAULT_CACHE

    src, recv = dirs
    p = src / "f.bin"
    p.write_bytes(os.urandom(3 * MiB))
    build_manifest(src, [src])  # cached under (path, size, mtime, ctime, inode)
    st = os.stat(p)
    with open(p, "r+b") as f:  # noqa: ASYNC230 - test setup
        f.seek(MiB + 10)
        f.write(b"tampered")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    # ctime moved on this file system; pretend it did not: the stale entry under the new key
    st2 = os.stat(p)
    stale = {k: v for k, v in DEFAULT_CACHE._items.items()
             if k[0].endswith("f.bin") and k[3] == st.st_ctime_ns}
    assert stale, "the manifest was not cached"
    for k, v in stale.items():
        DEFAULT_CACHE._items[(k[0], k[1], k[2], st2.st_ctime_ns, k[4])] = v
    re_requests: list[int] = []

    def count(data: bytes) -> bytes:
        msg = decode(data, TO_SOURCE)
        if type(msg).__name__ == "ChunkRequest" and msg.chunk == 1:  # type: ignore[attr-defined]
            re_requests.append(1)
        return data

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(Tap(a, count), src, [src]),
                                   receive_files(b, ReceiveStore(recv)), (a, b))
    assert isinstance(r_src, IntegrityError) and "changed while being sent" in str(r_src)
    assert isinstance(r_sink, RemoteError) and "changed while being sent" in str(r_sink)
    assert len(re_requests) == 2  # asked once, found bad, asked again: the sender checked
    assert visible_files(recv / "alice") == {}


async def test_chunk_whose_length_disagrees_with_its_frame_cuts_the_source_off(
        dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (src / "f.bin").write_bytes(os.urandom(MiB))
    sf = build_manifest(src, [src / "f.bin"])[0]

    async def push_long(ch: MemoryChannel) -> None:
        frame = ChunkData(0, 0, (src / "f.bin").read_bytes()).encode()
        await ch.send(frame + b"smuggled")

    a, b = memory_channel_pair("alice", "bob")
    said, r_sink = await run_pair(fake_source(a, [sf.entry.to_wire()], push_long),
                                  receive_files(b, ReceiveStore(recv)))
    await b.close()
    assert isinstance(r_sink, ProtocolError) and "disagrees" in str(r_sink)
    assert any(type(m).__name__ == "Abort" for m in said)
    assert visible_files(recv / "alice") == {}


async def test_receiver_writes_overlap_but_every_chunk_is_verified(
        dirs: tuple[Path, Path], monkeypatch: Any) -> None:
    """Chunks are handed to the writer thread, a few at a time, and each is hashed there."""
    from node.transfer import store as store_mod

    src, recv = dirs
    data = os.urandom(9 * MiB + 5)
    (src / "f.bin").write_bytes(data)
    seen: list[int] = []
    queued_max = 0
    real = store_mod.PartialFile.write_chunk

    def spy(self: store_mod.PartialFile, index: int, chunk: Any) -> bool:
        seen.append(index)
        return real(self, index, chunk)

    real_done = sess._Sink._write_done

    def write_done(self: Any, *args: Any) -> None:
        nonlocal queued_max
        queued_max = max(queued_max, len(self._writes))
        real_done(self, *args)

    monkeypatch.setattr(store_mod.PartialFile, "write_chunk", spy)
    monkeypatch.setattr(sess._Sink, "_write_done", write_done)
    a, b = memory_channel_pair("alice", "bob")
    _, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert sorted(seen) == list(range(10))
    assert 1 <= queued_max <= sess.MAX_PENDING_WRITES
    assert (recv / "alice" / "f.bin").read_bytes() == data


async def test_cancel_event_stops_both_sides(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (src / "f.bin").write_bytes(os.urandom(8 * MiB))
    cancel = asyncio.Event()

    def progress(p: TransferProgress) -> None:
        if p.bytes_done >= 2 * MiB:
            cancel.set()

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src], progress=progress, cancel=cancel),
                                   receive_files(b, ReceiveStore(recv)), (a, b))
    assert type(r_src).__name__ == "Cancelled"
    # the Abort usually arrives; if the sink was blocked sending, it sees the close
    assert (isinstance(r_sink, RemoteError) and "cancelled" in str(r_sink)) or \
        isinstance(r_sink, ChannelClosed), r_sink
    assert visible_files(recv / "alice") == {}


async def test_fetch_file_and_unknown_file(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (src / "d").mkdir()
    data = os.urandom(2 * MiB + 7)
    (src / "d" / "f.bin").write_bytes(data)
    root = build_manifest(src, [src / "d" / "f.bin"])[0].entry.root

    def resolve(rel: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
        p = src / rel
        return (src, p) if rel == "d/f.bin" else None

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(serve_fetch(a, resolve),
                                   fetch_file(b, "d/f.bin", root, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE and r_src.state == TransferState.DONE
    assert (recv / "alice" / "d" / "f.bin").read_bytes() == data

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(serve_fetch(a, resolve),
                                   fetch_file(b, "nope.txt", None, ReceiveStore(recv)))
    assert r_src.state == TransferState.FAILED
    assert isinstance(r_sink, RemoteError) and "no such file" in str(r_sink)

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(serve_fetch(a, resolve),
                                   fetch_file(b, "d/f.bin", b"\1" * 32, ReceiveStore(recv)))
    assert isinstance(r_sink, RemoteError) and "changed since" in str(r_sink)


async def test_silent_peer_times_out(dirs: tuple[Path, Path], monkeypatch: Any) -> None:
    monkeypatch.setattr(sess, "IDLE_TIMEOUT_S", 0.2)
    a, b = memory_channel_pair("alice", "bob")
    with pytest.raises(P2PError, match="sent nothing"):
        await receive_files(b, ReceiveStore(dirs[1]))
    await a.close()


def _take_no_chunk_frames(channel: MemoryChannel) -> None:
    """``channel``'s peer never takes a chunk frame sent on it (the send waits forever);
    smaller messages go through."""
    real_send = channel.send
    never = asyncio.Event()

    async def stuck_send(data: bytes) -> None:
        if len(data) > 64 * 1024:
            await never.wait()
        await real_send(data)

    channel.send = stuck_send  # type: ignore[method-assign]


async def test_peer_that_takes_no_chunk_is_unreachable(dirs: tuple[Path, Path],
                                                      monkeypatch: Any) -> None:
    """A peer that keeps talking but never takes a chunk frame: the send watchdog stops
    the source with PeerUnreachable (the chunk loop arms no timer per frame)."""
    from node.transfer.protocol import Keepalive

    src, recv = dirs
    (src / "f.bin").write_bytes(os.urandom(3 * MiB))
    a, b = memory_channel_pair("alice", "bob")
    sink = asyncio.ensure_future(receive_files(b, ReceiveStore(recv)))  # the default timeout
    await asyncio.sleep(0)  # the sink's session starts (and reads its idle timeout)
    monkeypatch.setattr(sess, "IDLE_TIMEOUT_S", 0.4)  # the source's
    _take_no_chunk_frames(a)

    async def chatter() -> None:  # keeps the source's idle timer (peer silent) quiet
        while True:
            await b.send(Keepalive("busy").encode())
            await asyncio.sleep(0.05)

    talk = asyncio.ensure_future(chatter())
    try:
        async with asyncio.timeout(10):
            with pytest.raises(PeerUnreachable, match="accepted nothing"):
                await send_files(a, src, [src / "f.bin"])
    finally:
        talk.cancel()
        await a.close()
        await b.close()
        for task in (talk, sink):
            with contextlib.suppress(BaseException):
                await task


async def test_a_send_stuck_after_the_peer_said_complete_is_still_bounded(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A sink that asks for every chunk, takes none, then says FileDone and Complete:
    the source's last sends (awaited after the driver finished) stay under the watchdog
    and end in PeerUnreachable instead of waiting forever (found in review)."""
    from node.transfer.protocol import (
        ChunkRequest,
        Complete,
        FileDone,
        FileStatus,
        Keepalive,
        Offer,
    )

    (tmp_path / "f.bin").write_bytes(os.urandom(3 * MiB))
    monkeypatch.setattr(sess, "IDLE_TIMEOUT_S", 0.4)
    a, b = memory_channel_pair("alice", "bob")
    _take_no_chunk_frames(a)
    source = asyncio.ensure_future(send_files(a, tmp_path, [tmp_path / "f.bin"]))
    try:
        while True:
            msg = decode(await b.recv(), (Offer, Keepalive))
            if isinstance(msg, Offer) and msg.last:
                break
        chunks = msg.files()[0].chunks
        await b.send(FileStatus(0, 0, chunks, "").encode())
        for c in range(chunks):
            await b.send(ChunkRequest(0, c).encode())
        await b.send(FileDone(0, True, "").encode())
        await b.send(Complete(msg.transfer_id).encode())
        async with asyncio.timeout(5):
            with pytest.raises(PeerUnreachable, match="accepted nothing"):
                await source
    finally:
        await a.close()
        await b.close()
        with contextlib.suppress(BaseException):
            await source


async def test_small_last_chunk_waits_behind_a_busy_writer_not_on_the_loop(
        dirs: tuple[Path, Path], monkeypatch: Any) -> None:
    """A file's small last chunk arriving while the writer thread still writes a large
    chunk of it (holding the file's lock) goes to the writer too: written on the loop,
    it would block the loop until the large write ended."""
    import threading

    from node.transfer import store as store_mod

    src, recv = dirs
    data = os.urandom(2 * MiB + 1000)
    (src / "f.bin").write_bytes(data)
    real = store_mod.PartialFile._write_chunk_locked
    where: dict[int, str] = {}

    def slow_write(self: store_mod.PartialFile, index: int, chunk: Any) -> bool:
        where[index] = threading.current_thread().name
        if len(chunk) > 64 * 1024:
            import time
            time.sleep(0.2)  # a slow large write: the small chunk arrives meanwhile
        return real(self, index, chunk)

    monkeypatch.setattr(store_mod.PartialFile, "_write_chunk_locked", slow_write)
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE, r_sink
    assert (recv / "alice" / "f.bin").read_bytes() == data
    assert where[2] == "p2pfs-write", where


async def test_memory_stays_bounded_for_a_64_mib_file(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    size = 64 * MiB
    with open(src / "big.bin", "wb") as f:  # noqa: ASYNC230 - test setup
        f.writelines(os.urandom(MiB) for _ in range(size // MiB))
    build_manifest(src, [src])  # warm the manifest cache outside the measurement
    tracemalloc.start()
    try:
        a, b = memory_channel_pair("alice", "bob")
        _r_src, r_sink = await run_pair(send_files(a, src, [src]),
                                       receive_files(b, ReceiveStore(recv)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r_sink.state == TransferState.DONE
    assert peak < 40 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    assert os.path.getsize(recv / "alice" / "big.bin") == size


async def test_crash_resume_uses_saved_state_and_rechecks_it(dirs: tuple[Path, Path],
                                                            monkeypatch: Any) -> None:
    """Like kill -9: no state saved at the end; a torn chunk on disk is fetched again."""
    from node.transfer import store as store_mod

    src, recv = dirs
    data = os.urandom(12 * MiB)
    (src / "f.bin").write_bytes(data)
    monkeypatch.setattr(store_mod, "STATE_SAVE_EVERY_CHUNKS", 4)
    monkeypatch.setattr(store_mod, "STATE_SAVE_INTERVAL_S", 1000.0)

    def crash_close(self: store_mod.PartialFile) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # no final state save, as if the process died
            self.fd = -1

    count = 0

    async def drop(msg: bytes) -> bytes:
        nonlocal count
        count += 1
        if count == 11:  # offer + 9 chunks written; state was saved after chunks 4 and 8
            await b.close()
            raise ChannelClosed("link dropped")
        return msg

    with monkeypatch.context() as m:
        m.setattr(store_mod.PartialFile, "_close_locked", crash_close)
        a, b = memory_channel_pair("alice", "bob")
        _, r_sink = await run_pair(send_files(a, src, [src]),
                                   receive_files(Tap(b, drop), ReceiveStore(recv)))
        assert isinstance(r_sink, ChannelClosed)
    part = next(p for p in (recv / "alice").iterdir() if p.name.endswith(".p2pfs-part"))
    # progress is saved in the background after every 4 chunks, so the state lists 4, 8
    # or 9 chunks depending on how the saves and the drop raced; read what it says
    state = next(p for p in (recv / "alice").iterdir() if p.name.endswith(".p2pfs-state"))
    bitmap = msgpack.unpackb(state.read_bytes())[-1]
    saved = [i for i in range(12) if bitmap[i >> 3] & (1 << (i & 7))]
    assert saved[:4] == [0, 1, 2, 3], saved  # the first save (after chunk 4) always lands
    with open(part, "r+b") as f:  # noqa: ASYNC230 - test setup
        f.seek(100)
        f.write(b"torn write")  # chunk 0 on disk no longer matches

    a, b = memory_channel_pair("alice", "bob")
    _, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    # every saved chunk but the torn one is kept; the torn one and the rest move again
    assert r_sink.bytes_received_payload == (12 - (len(saved) - 1)) * MiB
    assert (recv / "alice" / "f.bin").read_bytes() == data
    assert sorted(os.listdir(recv / "alice")) == ["f.bin"]


async def test_hostile_fetch_path_never_reaches_resolve(dirs: tuple[Path, Path]) -> None:
    asked: list[str] = []

    def resolve(rel: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
        asked.append(rel)
        return None

    from node.transfer.protocol import FetchRequest

    a, b = memory_channel_pair("alice", "bob")
    await b.send(FetchRequest(TID, "../../etc/passwd", None).encode())
    with pytest.raises(ProtocolError):
        await serve_fetch(a, resolve)
    assert asked == []
    with pytest.raises(ProtocolError):
        await fetch_file(b, "/etc/passwd", None, ReceiveStore(dirs[1]))


async def test_stale_partials_of_older_contents_are_cleaned(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    (recv / "alice").mkdir(parents=True)
    stale = recv / "alice" / ".f.txt.0123456789abcdef.p2pfs-part"
    stale.write_bytes(b"old partial")
    (recv / "alice" / ".f.txt.0123456789abcdef.p2pfs-state").write_bytes(b"x")
    other = recv / "alice" / ".g.txt.0123456789abcdef.p2pfs-part"
    other.write_bytes(b"keep")
    (src / "f.txt").write_text("new")
    a, b = memory_channel_pair("alice", "bob")
    _, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert sorted(os.listdir(recv / "alice")) == [other.name, "f.txt"]


async def test_slow_local_hashing_sends_keepalives(dirs: tuple[Path, Path],
                                                  monkeypatch: Any) -> None:
    """The sender hashing for longer than the idle timeout keeps the receiver waiting."""
    import time

    from node.transfer import manifest as mf

    src, recv = dirs
    (src / "f.bin").write_bytes(os.urandom(300_000))
    monkeypatch.setattr(sess, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(sess, "KEEPALIVE_INTERVAL_S", 0.1)
    real = mf.hash_file

    def slow_hash(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(mf, "hash_file", slow_hash)
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(send_files(a, src, [src]), receive_files(b, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE, r_sink
    assert (recv / "alice" / "f.bin").read_bytes() == (src / "f.bin").read_bytes()


# -- many small files in one session (folder sync's batched fetch) ----------------------

def _small_tree(src: Path, n: int, seed: int = 7) -> dict[str, bytes]:
    import random
    rng = random.Random(seed)
    files = {f"share/f{i:04d}.bin": rng.randbytes(rng.randint(1, 10_000)) for i in range(n)}
    (src / "share").mkdir()
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    return files


def _resolver(src: Path) -> Any:
    def resolve(rel: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
        p = src / rel
        return (src, p) if p.is_file() else None
    return resolve


async def test_fetch_files_brings_a_batch_of_small_files_in_one_session(
        dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    files = _small_tree(src, 300)
    wanted = sorted(files) + ["share/gone.bin"]  # one the source does not have
    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(serve_fetch(a, _resolver(src)),
                                   sess.fetch_files(b, [(p, None) for p in wanted],
                                                    ReceiveStore(recv)))
    assert r_src.state == TransferState.DONE, r_src
    assert sorted(f.rel_path for f in r_sink.files) == sorted(files)
    assert [p for p, _ in r_sink.failures] == ["share/gone.bin"]
    assert visible_files(recv / "alice") == files
    # every file fsynced before its rename; no partial or state file is left behind
    assert sorted(os.listdir(recv / "alice" / "share")) == sorted(
        p.split("/")[1] for p in files)


async def test_fetch_files_refuses_a_corrupted_file_and_fetches_it_again(
        dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    files = _small_tree(src, 40)
    flipped: list[int] = []

    def hook(data: bytes) -> bytes:
        try:
            msg = decode(data, (ChunkData,))
        except P2PError:
            return data
        if msg.index == 17 and not flipped:  # one small file's only chunk, once
            flipped.append(msg.index)
            bad = bytearray(msg.data)
            bad[0] ^= 0x01
            return ChunkData(msg.index, msg.chunk, bytes(bad)).encode()
        return data

    a, b = memory_channel_pair("alice", "bob")
    _r_src, r_sink = await run_pair(
        serve_fetch(a, _resolver(src)),
        sess.fetch_files(Tap(b, hook), [(p, None) for p in sorted(files)], ReceiveStore(recv)))
    assert flipped == [17]
    assert r_sink.state == TransferState.DONE
    assert r_sink.bytes_received_payload == sum(map(len, files.values())) + len(
        files[sorted(files)[17]])  # that file came twice
    assert visible_files(recv / "alice") == files


async def test_fetch_files_cut_midway_shows_only_whole_files_and_resumes(
        dirs: tuple[Path, Path], monkeypatch: Any) -> None:
    monkeypatch.setattr(sess, "COMMIT_BATCH_FILES", 16)  # some commits before the cut
    src, recv = dirs
    files = _small_tree(src, 200)
    a, b = memory_channel_pair("alice", "bob")
    got = 0

    async def drop_midway(msg: bytes) -> bytes:
        nonlocal got
        got += 1
        if got == 120:  # offers + about a hundred chunks, then the link dies
            await b.close()
        return msg

    items = [(p, None) for p in sorted(files)]
    r_src, r_sink = await run_pair(serve_fetch(a, _resolver(src)),
                                   sess.fetch_files(Tap(b, drop_midway), items,
                                                    ReceiveStore(recv)))
    assert isinstance(r_sink, ChannelClosed), r_sink
    shown = visible_files(recv / "alice")
    assert 0 < len(shown) < len(files)
    assert all(files[p] == data for p, data in shown.items())  # nothing half-written shows

    a, b = memory_channel_pair("alice", "bob")
    r_src, r_sink = await run_pair(serve_fetch(a, _resolver(src)),
                                   sess.fetch_files(b, items, ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE
    assert r_sink.bytes_received_payload < sum(map(len, files.values()))  # only the rest
    assert visible_files(recv / "alice") == files
    assert sorted(os.listdir(recv / "alice" / "share")) == sorted(
        p.split("/")[1] for p in files)


async def test_fetch_files_answered_with_a_file_not_asked_for_is_refused(
        dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    files = _small_tree(src, 3)
    entries = [f.entry.to_wire() for f in build_manifest(src, [src / "share"])]
    a, b = memory_channel_pair("alice", "bob")

    async def source() -> list[Any]:
        first = decode(await a.recv(), TO_SOURCE)
        assert isinstance(first, sess.FetchManyRequest)
        await a.send(Offer(first.transfer_id, 0, True, tuple(entries)).encode())
        return [decode(await a.recv(), TO_SOURCE)]

    # the sink asked for two of the three files; the offer lists all three
    said, r_sink = await run_pair(source(), sess.fetch_files(
        b, [(p, None) for p in sorted(files)[:2]], ReceiveStore(recv)))
    assert isinstance(r_sink, ProtocolError) and "not asked for" in str(r_sink)
    assert type(said[0]).__name__ == "Abort"  # the source is told why
    assert not (recv / "alice" / "share").exists()


async def test_fetch_files_to_an_older_peer_fails_with_its_protocol_error(
        dirs: tuple[Path, Path], monkeypatch: Any) -> None:
    """An old peer's serve_fetch knows only FetchRequest: its Abort names the unknown type,
    which is what ShareService.fetch_many falls back to one fetch per file on."""
    src, recv = dirs
    _small_tree(src, 2)
    a, b = memory_channel_pair("alice", "bob")
    old_expect = (sess.FetchRequest, sess.Abort)

    async def old_serve() -> Any:
        session = sess._Session(a, None, None)

        async def first() -> Any:
            await session._recv(old_expect)

        return await session._guard(first)

    r_src, r_sink = await run_pair(old_serve(), sess.fetch_files(
        b, [("share/f0000.bin", None)], ReceiveStore(recv)))
    assert isinstance(r_src, ProtocolError)
    assert isinstance(r_sink, RemoteError)
    assert r_sink.code == "ProtocolError"  # type: ignore[attr-defined]
    assert "fetchmany" in str(r_sink)


class SendTap(Tap):
    """Records the type of every message this end sends."""

    def __init__(self, inner: MemoryChannel) -> None:
        super().__init__(inner, lambda d: d)
        self.sent: list[str] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(msgpack.unpackb(data)[0])
        await self.inner.send(data)


async def test_small_files_come_inline_without_a_request_each(dirs: tuple[Path, Path]) -> None:
    src, recv = dirs
    files = _small_tree(src, 50)
    (src / "share" / "have.bin").write_bytes(b"already here")
    files_all = {**files, "share/have.bin": b"already here"}
    (recv / "alice" / "share").mkdir(parents=True)
    (recv / "alice" / "share" / "have.bin").write_bytes(b"already here")
    a, b = memory_channel_pair("alice", "bob")
    tap = SendTap(b)
    r_src, r_sink = await run_pair(serve_fetch(a, _resolver(src)),
                                   sess.fetch_files(tap, [(p, None) for p in sorted(files_all)],
                                                    ReceiveStore(recv)))
    assert r_sink.state == TransferState.DONE and r_src.state == TransferState.DONE
    assert visible_files(recv / "alice") == files_all
    # one request for the batch; per file only FileDone (or HAVE): no status + request each
    assert tap.sent.count("xfer.fetchmany") == 1
    assert tap.sent.count("xfer.req") == 0
    assert tap.sent.count("xfer.done") == 50
    assert tap.sent.count("xfer.status") == 1  # have.bin: HAVE, its inline data dropped
    assert tap.sent[-1] == "xfer.complete"
