"""MirrorService (the --share driver) on real temp dirs, with gossip and the transfer
layer faked: what it publishes, fetches, refuses to serve and reports."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import blake3

from node.errors import P2PError, PeerUnreachable
from node.folders.mirror_service import MirrorService
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.identity import Identity, PeerId

ALICE = Identity.generate(name="alice", seed=b"\x0a" * 32)
ME = Identity.generate(name="me", seed=b"\x0b" * 32)


def h(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


class FakeGossip:
    def __init__(self) -> None:
        self.published: list[tuple[str, list[tuple[str, str, int, bytes, str]]]] = []

    async def publish_local(self, kind: str, folder: str, path: str, size: int, hash: bytes,
                            old_path: str = "") -> None:
        self.published.append((folder, [(kind, path, size, hash, old_path)]))

    async def publish_local_many(self, folder: str,
                                 changes: list[tuple[str, str, int, bytes, str]]) -> None:
        self.published.append((folder, changes))


class FakeTransfers:
    """Plays ShareService: writes what the origin holds where the transfer layer would."""

    def __init__(self, received: Path, content: dict[str, bytes]) -> None:
        self.received = received
        self.content = content
        self.asked: list[list[str]] = []

    async def fetch(self, peer: PeerId, rel_path: str, root_hash: bytes | None) -> object:
        got = (await self.fetch_many(peer, [rel_path]))[rel_path]
        if isinstance(got, P2PError):
            raise got
        return SimpleNamespace(files=[SimpleNamespace(path=got)])

    async def fetch_many(self, peer: PeerId, rel_paths: list[str]
                         ) -> dict[str, Path | P2PError]:
        self.asked.append(rel_paths)
        out: dict[str, Path | P2PError] = {}
        for rel in rel_paths:
            if rel not in self.content:
                out[rel] = PeerUnreachable(f"{peer.short} is offline")
                continue
            f = self.received / "alice" / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(self.content[rel])
            out[rel] = f
        return out


def event(kind: str, path: str, data: bytes, seq: int) -> ChangeEvent:
    return ChangeEvent.create(ALICE, folder="docs", seq=seq, lamport=seq, kind=kind,
                              path=path, size=len(data), hash=h(data))


def service(tmp_path: Path, shared: dict[str, Path], content: dict[str, bytes]
            ) -> tuple[MirrorService, FakeGossip, FakeTransfers, EventLog]:
    received = tmp_path / "received"
    received.mkdir()
    gossip = FakeGossip()
    transfers = FakeTransfers(received, content)
    events = EventLog(":memory:")
    mirror = MirrorService(shared, received, self_id=ME.peer_id, home=tmp_path / "home",
                           gossip=gossip, transfers=transfers, events=events,
                           label_for=lambda _p: "alice")
    return mirror, gossip, transfers, events


async def test_accepted_events_are_fetched_together_and_failures_reported(
        tmp_path: Path) -> None:
    mirror, _gossip, transfers, events = service(
        tmp_path, {}, {"docs/a.txt": b"A", "docs/b.txt": b"B"})
    try:
        await mirror.apply_events([
            event("created", "a.txt", b"A", 1), event("created", "b.txt", b"B", 2),
            event("created", "gone.txt", b"G", 3),
            event("shared", "one-off.txt", b"pushed", 4)])  # a `node share`: only told
        base = tmp_path / "received" / "alice" / "docs"
        assert (base / "a.txt").read_bytes() == b"A" and (base / "b.txt").read_bytes() == b"B"
        assert transfers.asked == [["docs/a.txt", "docs/b.txt", "docs/gone.txt"]]
        kinds = [(n.kind, n.data.get("path") or n.data.get("paths")) for n in
                 events.notifications()]
        assert ("transfer_failed", ["docs/gone.txt"]) in kinds
        assert [k for k, _p in kinds].count("file_received") == 2
        # the single-event path does the same, one fetch per event
        await mirror.apply_event(event("modified", "a.txt", b"A2", 5))
        assert [n.kind for n in events.notifications()][-1] == "transfer_failed"
        transfers.content["docs/a.txt"] = b"A2"
        await mirror.apply_event(event("modified", "a.txt", b"A2", 6))
        assert (base / "a.txt").read_bytes() == b"A2"
    finally:
        mirror.close()
        events.close()


async def test_a_peer_may_fetch_only_a_file_inside_a_share(tmp_path: Path) -> None:
    docs = tmp_path / "share" / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "x.txt").write_bytes(b"x")
    (docs / "peers.db").write_bytes(b"state")  # a state file name is never served
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (docs / "link").symlink_to(outside)
    mirror, _g, _t, events = service(tmp_path, {"docs": docs}, {})
    try:
        assert mirror.resolve_fetch("docs/sub/x.txt", None) == (docs.parent,
                                                                 docs / "sub" / "x.txt")
        for refused in ("docs/sub", "docs/peers.db", "docs/link/secret", "docs/../outside",
                        "other/sub/x.txt", "docs/missing", "docs"):
            assert mirror.resolve_fetch(refused, None) is None, refused
    finally:
        mirror.close()
        events.close()


async def test_watchers_publish_the_share_and_report_it(tmp_path: Path) -> None:
    docs = tmp_path / "share" / "docs"
    docs.mkdir(parents=True)
    (docs / "x.txt").write_bytes(b"x")
    (tmp_path / "home").mkdir()
    mirror, gossip, _t, events = service(tmp_path, {"docs": docs}, {})
    try:
        assert mirror.folders_json() == []
        await mirror.start()  # the scan announces what changed while we were stopped
        assert gossip.published == [("docs", [("created", "x.txt", 1, h(b"x"), "")])]
        assert (tmp_path / "home" / "index-docs.db").is_file()
        [row] = mirror.folders_json()
        assert (row["label"], row["state"], row["files"], row["bytes"]) == (
            "docs", "watching", 1, 1)
        # what the mirror itself holds is found by hash (copied, not fetched)
        assert mirror._local_lookup(h(b"x")) == docs / "x.txt"
    finally:
        await mirror.stop()
        mirror.close()
        events.close()
    assert mirror.folders_json() == []
