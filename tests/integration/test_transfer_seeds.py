"""Chunk reuse (seeds): a fetch copies the chunks local files already hold, and fetches
only the rest; every copied chunk is verified like a fetched one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import msgpack

from node.identity import Identity, PeerId
from node.memory_channel import channel_pair
from node.sharing import ShareService
from node.transfer import session as sess
from node.transfer.manifest import DEFAULT_CACHE, DEFAULT_CHUNK_SIZE_BYTES, chunk_size_for

ME = Identity.generate(name="me", seed=b"\x03" * 32)
PEER = Identity.generate(name="peer", seed=b"\x04" * 32)
MiB = 1 << 20


class CountingEnd:
    """The serving end of a channel, counting what the fetching side asks for."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.peer = inner.peer
        self.peer_name = inner.peer_name
        self.transport = inner.transport
        self.requests = 0
        self.sent_bytes = 0

    async def send(self, data: bytes) -> None:
        self.sent_bytes += len(data)
        await self.inner.send(data)

    async def recv(self) -> bytes:
        data = await self.inner.recv()
        if msgpack.unpackb(data)[0] == "xfer.req":
            self.requests += 1
        return data

    async def close(self) -> None:
        await self.inner.close()


class FakePeering:
    def __init__(self, src: Path) -> None:
        self.src = src
        self.ends: list[CountingEnd] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def register(self, service: str, handler: Any) -> None:
        pass

    def on_revoke(self, callback: Any) -> None:
        pass

    async def connect(self, peer: PeerId, service: str, *, transport: str = "") -> Any:
        mine, theirs = channel_pair(ME.peer_id, peer)
        mine.transport = theirs.transport = "tcp"
        end = CountingEnd(theirs)
        self.ends.append(end)
        src = self.src

        def resolve(rel: str, root: bytes | None) -> tuple[Path, Path] | None:
            return (src, src / rel) if (src / rel).is_file() else None

        async def run() -> None:
            try:
                await sess.serve_fetch(end, resolve)
            finally:
                await end.close()
        self.tasks.append(asyncio.ensure_future(run()))
        return mine


def _service(tmp_path: Path) -> tuple[ShareService, FakePeering]:
    peering = FakePeering(tmp_path / "src")
    share = ShareService(peering, tmp_path / "received",  # type: ignore[arg-type]
                         notify=lambda notice: None, label_for=lambda p: "peer",
                         resolve_shared=lambda r, h: None,
                         default_transport="tcp", targets=lambda: [])
    return share, peering


def _versions(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    """An 8 MiB file on the receiver (the old version) and the same plus 2 bytes at the
    source; returns (old, new, path of the old copy)."""
    assert chunk_size_for(8 * MiB + 2) == DEFAULT_CHUNK_SIZE_BYTES == MiB
    old = os.urandom(8 * MiB)
    new = old + b"!!"
    (tmp_path / "src" / "docs").mkdir(parents=True)
    (tmp_path / "src" / "docs" / "big.bin").write_bytes(new)
    mine = tmp_path / "received" / "peer" / "docs" / "big.bin"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(old)
    return old, new, mine


async def test_appending_two_bytes_moves_one_chunk_with_the_old_file_as_seed(
        tmp_path: Path) -> None:
    old, new, mine = _versions(tmp_path)
    share, peering = _service(tmp_path)
    result = await share.fetch(PEER.peer_id, "docs/big.bin", None, seeds=[mine])
    await asyncio.gather(*peering.tasks)
    assert result.state is sess.TransferState.DONE
    assert mine.read_bytes() == new
    end = peering.ends[0]
    assert end.requests == 1  # the 2-byte tail chunk, nothing else
    assert end.sent_bytes < 64 << 10  # manifest + one tiny chunk on the wire
    assert result.bytes_received_payload == 2
    kept = list((tmp_path / "received" / "peer" / ".p2pfs-versions" / "docs").iterdir())
    assert [p.read_bytes() == old for p in kept] == [True]  # the old version is kept


async def test_without_seeds_every_chunk_is_fetched(tmp_path: Path) -> None:
    _old, new, mine = _versions(tmp_path)
    share, peering = _service(tmp_path)
    await share.fetch(PEER.peer_id, "docs/big.bin", None)
    await asyncio.gather(*peering.tasks)
    assert mine.read_bytes() == new
    assert peering.ends[0].requests == 9


async def test_a_seed_changed_after_it_was_hashed_is_caught_and_its_chunk_fetched(
        tmp_path: Path) -> None:
    old, new, mine = _versions(tmp_path)
    seed = tmp_path / "elsewhere.bin"
    seed.write_bytes(old)
    st = os.stat(seed)
    DEFAULT_CACHE.get_or_hash(seed, st)  # hashed now ...
    with open(seed, "r+b") as f:  # ... changed in place, size and mtime as before
        f.seek(3 * MiB + 17)
        f.write(b"\x00" if old[3 * MiB + 17] else b"\x01")
    os.utime(seed, ns=(st.st_atime_ns, st.st_mtime_ns))
    mine.unlink()
    share, peering = _service(tmp_path)
    result = await share.fetch(PEER.peer_id, "docs/big.bin", None, seeds=[seed])
    await asyncio.gather(*peering.tasks)
    assert result.state is sess.TransferState.DONE
    assert mine.read_bytes() == new
    assert peering.ends[0].requests == 2  # the changed chunk 3 and the new tail


async def test_fetch_many_reuses_chunks_of_other_files(tmp_path: Path) -> None:
    (tmp_path / "src" / "docs").mkdir(parents=True)
    body = os.urandom(3 * MiB)
    files = {"docs/a.bin": body + b"a", "docs/b.bin": body + b"bb", "docs/s.txt": b"small"}
    for rel, data in files.items():
        (tmp_path / "src" / rel).write_bytes(data)
    other = tmp_path / "other.bin"
    other.write_bytes(body)
    share, peering = _service(tmp_path)
    got = await share.fetch_many(PEER.peer_id, sorted(files), seeds=[other, tmp_path / "gone"])
    await asyncio.gather(*peering.tasks)
    for rel, data in files.items():
        assert Path(got[rel]).read_bytes() == data  # type: ignore[arg-type]
    assert peering.ends[0].requests == 2  # the tail chunk of a.bin and of b.bin


async def test_seeded_chunks_are_in_the_resume_state_of_an_interrupted_fetch(
        tmp_path: Path) -> None:
    """The channel dies right after the offer: the chunks copied from the seed are saved
    as verified, so the next fetch (no seeds now) asks only for the rest."""
    from node.memory_channel import memory_channel_pair
    from node.transfer.manifest import build_manifest
    from node.transfer.protocol import TO_SOURCE, Offer, decode
    from node.transfer.store import ReceiveStore

    old, new, mine = _versions(tmp_path)
    seed = tmp_path / "old.bin"
    mine.rename(seed)
    src = tmp_path / "src"
    store = ReceiveStore(tmp_path / "received")
    a, b = memory_channel_pair("peer", "me")

    async def cut_after_offer() -> None:
        request = decode(await a.recv(), TO_SOURCE)
        entries = [f.entry.to_wire() for f in build_manifest(src, [src / "docs/big.bin"])]
        await a.send(Offer(request.transfer_id, 0, True, tuple(entries)).encode())
        decode(await a.recv(), TO_SOURCE)  # the sink's status: it planned (and seeded)
        await a.close()

    outcome = await asyncio.gather(
        cut_after_offer(), sess.fetch_file(b, "docs/big.bin", None, store, seeds=[seed]),
        return_exceptions=True)
    assert isinstance(outcome[1], Exception)  # the channel died mid-fetch
    assert not mine.exists()
    share, peering = _service(tmp_path)
    await share.fetch(PEER.peer_id, "docs/big.bin", None)  # resumes; no seed this time
    await asyncio.gather(*peering.tasks)
    assert mine.read_bytes() == new
    assert peering.ends[0].requests == 1
