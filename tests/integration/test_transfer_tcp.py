"""Transfers over a real SecureChannel on TCP 127.0.0.1 (port 0): encryption + sockets."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from node.errors import ChannelClosed
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
