"""ShareService.fetch_many over in-memory channels: one session per batch, and a peer with
the older transfer protocol (no xfer.fetchmany) is asked one file at a time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from node.identity import Identity, PeerId
from node.memory_channel import channel_pair
from node.sharing import ShareService
from node.transfer import session as sess

ME = Identity.generate(name="me", seed=b"\x01" * 32)
PEER = Identity.generate(name="peer", seed=b"\x02" * 32)


class FakePeering:
    """connect() hands back one end of a memory channel; `serve` runs on the other end."""

    def __init__(self, serve: Any) -> None:
        self.serve = serve
        self.connects: list[str] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def register(self, service: str, handler: Any) -> None:
        pass

    def on_revoke(self, callback: Any) -> None:
        pass

    async def connect(self, peer: PeerId, service: str, *, transport: str = "") -> Any:
        self.connects.append(service)
        mine, theirs = channel_pair(ME.peer_id, peer)
        mine.transport = theirs.transport = "tcp"

        async def run() -> None:
            try:
                await self.serve(theirs)
            finally:
                await theirs.close()
        self.tasks.append(asyncio.ensure_future(run()))
        return mine


def _tree(src: Path, n: int) -> dict[str, bytes]:
    (src / "docs").mkdir(parents=True)
    files = {f"docs/f{i}.txt": os.urandom(100 + i) for i in range(n)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    return files


def _service(tmp_path: Path, serve: Any) -> tuple[ShareService, FakePeering]:
    peering = FakePeering(serve)
    share = ShareService(peering, tmp_path / "received",  # type: ignore[arg-type]
                         notify=lambda notice: None, label_for=lambda p: "peer",
                         resolve_shared=lambda r, h: None,
                         default_transport="tcp", targets=lambda: [])
    return share, peering


async def test_fetch_many_uses_one_session_for_the_batch(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _tree(src, 20)

    def resolve(rel: str, root: bytes | None) -> tuple[Path, Path] | None:
        return (src, src / rel) if (src / rel).is_file() else None

    share, peering = _service(tmp_path, lambda ch: sess.serve_fetch(ch, resolve))
    got = await share.fetch_many(PEER.peer_id, [*sorted(files), "docs/missing.txt"])
    await asyncio.gather(*peering.tasks)
    assert peering.connects == ["fetch"]  # one channel, one session
    for rel, data in files.items():
        assert Path(got[rel]).read_bytes() == data  # type: ignore[arg-type]
    assert isinstance(got["docs/missing.txt"], Exception)


async def test_an_older_peer_is_asked_one_file_at_a_time(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _tree(src, 3)

    def resolve(rel: str, root: bytes | None) -> tuple[Path, Path] | None:
        return (src, src / rel) if (src / rel).is_file() else None

    async def old_serve(ch: Any) -> Any:
        """serve_fetch as an older node runs it: FetchRequest is all it knows (its Abort
        then says "unknown message type 'xfer.fetchmany'"; here: "unexpected ...")."""
        session = sess._Session(ch, None, None)
        try:
            msg = await session._guard(lambda: session._recv((sess.FetchRequest, sess.Abort)))
        except Exception:
            return None
        found = resolve(msg.path, msg.root)
        assert found is not None
        offered = sess.build_manifest(found[0], [found[1]])
        return await sess._Source(ch, msg.transfer_id, offered, None, None).run()

    share, peering = _service(tmp_path, old_serve)
    got = await share.fetch_many(PEER.peer_id, sorted(files))
    await asyncio.gather(*peering.tasks, return_exceptions=True)
    assert peering.connects == ["fetch"] * 4  # the batch, refused; then one per file
    for rel, data in files.items():
        assert Path(got[rel]).read_bytes() == data  # type: ignore[arg-type]
