"""Transfers over a real SecureChannel on TCP 127.0.0.1 (port 0): encryption + sockets."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from node.errors import ChannelClosed
from node.transfer import session
from node.transfer.bench import tcp_channel_pair
from node.transfer.session import TransferState, receive_files, send_files
from node.transfer.store import ReceiveStore

MiB = 1 << 20


async def test_directory_over_secure_tcp_and_resume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(6 * MiB + 17)
    (src / "big.bin").write_bytes(big)
    (src / "sub" / "small.txt").write_bytes(b"small")
    recv = tmp_path / "received"

    # first attempt: the receiver's link drops after a few chunks
    async with tcp_channel_pair() as (a, b):
        count = 0
        real_recv = b.recv

        async def dropping_recv() -> bytes:
            nonlocal count
            count += 1
            if count == 5:
                await b.close()
            return await real_recv()

        b.recv = dropping_recv
        b.recv_nowait = lambda: None  # every message goes through dropping_recv
        res = await asyncio.gather(send_files(a, src, [src]),
                                   receive_files(b, ReceiveStore(recv)), return_exceptions=True)
        assert all(isinstance(r, ChannelClosed) for r in res), res
        assert not (recv / "alice" / "big.bin").exists()

    async with tcp_channel_pair() as (a, b):
        r_src, r_sink = await asyncio.gather(send_files(a, src, [src]),
                                             receive_files(b, ReceiveStore(recv)))
    assert r_src.state == r_sink.state == TransferState.DONE
    assert r_sink.peer == "alice"
    assert (recv / "alice" / "big.bin").read_bytes() == big
    assert (recv / "alice" / "sub" / "small.txt").read_bytes() == b"small"
    assert r_sink.bytes_received_payload < len(big)


@pytest.mark.skipif(not session._RWF_NOWAIT or not hasattr(os, "posix_fadvise"),
                    reason="needs preadv RWF_NOWAIT and posix_fadvise (Linux)")
async def test_chunks_not_in_the_page_cache_are_read_in_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source reads cached chunks on the loop (RWF_NOWAIT); a chunk the cache does not
    hold makes that read give up, and the thread reads it: the file arrives whole."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * MiB + 5)
    path = src / "cold.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
    finally:
        os.close(fd)
    outcomes: list[tuple[bool, bool]] = []  # (nowait, read something)
    real = session._Source._read_chunk

    def spy(self: object, *args: object, nowait: bool = False) -> object:
        got = real(self, *args, nowait=nowait)  # type: ignore[arg-type]
        outcomes.append((nowait, got is not None))
        return got

    monkeypatch.setattr(session._Source, "_read_chunk", spy)
    real_hash = session.build_manifest

    def manifest_then_evict(root: Path, paths: list[Path]) -> object:
        out = real_hash(root, paths)  # hashing read the file into the cache: drop it again
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return out

    monkeypatch.setattr(session, "build_manifest", manifest_then_evict)
    recv = tmp_path / "received"
    async with tcp_channel_pair() as (a, b):
        r_src, r_sink = await asyncio.gather(send_files(a, src, [src]),
                                             receive_files(b, ReceiveStore(recv)))
    assert r_src.state == r_sink.state == TransferState.DONE
    assert (recv / "alice" / "cold.bin").read_bytes() == data
    assert (True, False) in outcomes, outcomes  # a no-wait read gave up on a cold chunk
    assert (False, True) in outcomes, outcomes  # ... and the thread read it


@pytest.mark.skipif(not session._RWF_NOWAIT, reason="needs preadv RWF_NOWAIT (Linux)")
async def test_a_file_system_without_no_wait_reads_is_read_in_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs, NFS and FUSE answer RWF_NOWAIT with EOPNOTSUPP: that is no reason to fail
    the transfer; the source stops trying no-wait reads and its thread reads instead."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * MiB + 5)
    (src / "f.bin").write_bytes(data)
    real_preadv = os.preadv
    refused: list[int] = []

    def preadv(fd: int, buffers: object, offset: int, flags: int = 0) -> int:
        if flags & session._RWF_NOWAIT:
            refused.append(offset)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_preadv(fd, buffers, offset, flags)  # type: ignore[arg-type]

    monkeypatch.setattr(session.os, "preadv", preadv)
    recv = tmp_path / "received"
    async with tcp_channel_pair() as (a, b):
        r_src, r_sink = await asyncio.gather(send_files(a, src, [src]),
                                             receive_files(b, ReceiveStore(recv)))
    assert r_src.state == r_sink.state == TransferState.DONE, (r_src.error, r_sink.error)
    assert (recv / "alice" / "f.bin").read_bytes() == data
    assert len(refused) == 1  # asked once, then never again for this source
