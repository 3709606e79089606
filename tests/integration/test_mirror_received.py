"""The --share mirror's ReceivedMirror on real temp dirs with a fake fetch: fetch,
copy-by-hash, versions, moves (the pure rules: tests/unit/test_mirror_rules.py)."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest

from node.errors import IntegrityError, LocalIOError, ProtocolError
from node.folders.mirror import MirrorOutcome
from node.folders.mirror_service import ReceivedMirror
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.identity import Identity, PeerId

ALICE = Identity.generate(name="alice", seed=b"\x0a" * 32)
ME = Identity.generate(name="me", seed=b"\x0b" * 32)


def h(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


class FakeFetch:
    """Plays the transfer layer: writes the peer's content into a staging dir."""

    def __init__(self, staging: Path, content: dict[str, bytes]) -> None:
        self.staging = staging
        self.content = content
        self.calls: list[tuple[PeerId, str, str, bytes]] = []

    async def __call__(self, origin: PeerId, folder: str, path: str, digest: bytes) -> Path:
        self.calls.append((origin, folder, path, digest))
        self.staging.mkdir(exist_ok=True)
        out = self.staging / f"{len(self.calls)}.bin"
        out.write_bytes(self.content[path])
        return out


class Events:
    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, path: str, data: bytes | None = None,
                 old_path: str = "") -> ChangeEvent:
        self.seq += 1
        return ChangeEvent.create(ALICE, folder="docs", seq=self.seq, lamport=self.seq,
                                  kind=kind, path=path, old_path=old_path,
                                  size=len(data) if data is not None else 0,
                                  hash=h(data) if data is not None else b"")


def engine(tmp_path: Path, fetch: FakeFetch, **kw) -> tuple[ReceivedMirror, list]:
    suppressed: list[tuple[Path, bytes]] = []
    eng = ReceivedMirror(tmp_path / "received", self_id=ME.peer_id, fetch=fetch,
                     origin_label=lambda p: "alice",
                     suppress=lambda p, d: suppressed.append((p, d)), **kw)
    return eng, suppressed


async def test_create_modify_delete_move(tmp_path: Path) -> None:
    fetch = FakeFetch(tmp_path / "staging", {"a/x.txt": b"v1"})
    log = EventLog(":memory:")
    eng, suppressed = engine(tmp_path, fetch, log=log)
    ev = Events()
    target = tmp_path / "received" / "alice" / "docs" / "a" / "x.txt"
    try:
        assert await eng.apply(ev("created", "a/x.txt", b"v1")) is MirrorOutcome.FETCHED
        assert target.read_bytes() == b"v1"
        assert (target, h(b"v1")) in suppressed  # the watcher will not echo it
        assert [n.kind for n in log.notifications()] == ["file_received"]

        fetch.content["a/x.txt"] = b"v2"
        assert await eng.apply(ev("modified", "a/x.txt", b"v2")) is MirrorOutcome.FETCHED
        assert target.read_bytes() == b"v2"
        versions = list((tmp_path / "received" / "alice" / ".p2pfs-versions").rglob("x.txt~*"))
        assert [v.read_bytes() for v in versions] == [b"v1"]  # the old copy was kept

        moved = tmp_path / "received" / "alice" / "docs" / "b" / "y.txt"
        calls = len(fetch.calls)
        assert await eng.apply(ev("moved", "b/y.txt", b"v2", old_path="a/x.txt")) \
            is MirrorOutcome.MOVED
        assert moved.read_bytes() == b"v2" and not target.exists()
        assert len(fetch.calls) == calls  # a move is not a transfer

        assert await eng.apply(ev("deleted", "b/y.txt")) is MirrorOutcome.VERSIONED
        assert not moved.exists()
        kept = list((tmp_path / "received" / "alice" / ".p2pfs-versions").rglob("y.txt~*"))
        assert [v.read_bytes() for v in kept] == [b"v2"]  # nothing destroyed
    finally:
        eng.close()
        log.close()


async def test_same_content_is_copied_not_fetched(tmp_path: Path) -> None:
    fetch = FakeFetch(tmp_path / "staging", {})
    mine = tmp_path / "myshare" / "song.mp3"
    mine.parent.mkdir()
    mine.write_bytes(b"music" * 1000)
    eng, _ = engine(tmp_path, fetch,
                    local_lookup=lambda d: mine if d == h(mine.read_bytes()) else None)
    ev = Events()
    try:
        out = await eng.apply(ev("shared", "music/song.mp3", b"music" * 1000))
        assert out is MirrorOutcome.COPIED and fetch.calls == []
        copy = tmp_path / "received" / "alice" / "docs" / "music" / "song.mp3"
        assert copy.read_bytes() == b"music" * 1000 and mine.exists()
        # a second path with the same content is copied from what we received
        out = await eng.apply(ev("created", "again.mp3", b"music" * 1000))
        assert out is MirrorOutcome.COPIED and fetch.calls == []
        # and content we already hold at the target needs nothing at all
        assert await eng.apply(ev("modified", "again.mp3", b"music" * 1000)) \
            is MirrorOutcome.UNCHANGED
    finally:
        eng.close()


async def test_stale_own_and_bad_content(tmp_path: Path) -> None:
    fetch = FakeFetch(tmp_path / "staging", {"f": b"good"})
    eng, _ = engine(tmp_path, fetch)
    ev = Events()
    try:
        old = ev("created", "f", b"good")
        newer = ev("modified", "f", b"good")
        assert await eng.apply(newer) is MirrorOutcome.FETCHED
        assert await eng.apply(old) is MirrorOutcome.STALE
        mine = ChangeEvent.create(ME, folder="docs", seq=1, lamport=1, kind="created",
                                  path="f", size=1, hash=h(b"x"))
        assert await eng.apply(mine) is MirrorOutcome.SKIPPED
        fetch.content["g"] = b"tampered"
        with pytest.raises(IntegrityError):
            await eng.apply(ev("created", "g", b"what was announced"))
        assert not (tmp_path / "received" / "alice" / "docs" / "g").exists()
        with pytest.raises(ProtocolError):  # internal names never come from a peer
            await eng.apply(ev("created", "x.p2pfs-part", b"p"))
    finally:
        eng.close()


async def test_symlink_in_target_is_refused(tmp_path: Path) -> None:
    fetch = FakeFetch(tmp_path / "staging", {"evil/f": b"data"})
    eng, _ = engine(tmp_path, fetch)
    outside = tmp_path / "outside"
    outside.mkdir()
    base = tmp_path / "received" / "alice" / "docs"
    base.mkdir(parents=True)
    (base / "evil").symlink_to(outside)
    try:
        with pytest.raises(LocalIOError) as info:
            await eng.apply(Events()("created", "evil/f", b"data"))
        assert "symlink" in str(info.value)
        assert list(outside.iterdir()) == []
    finally:
        eng.close()


class FakeFetchMany:
    """Plays ShareService.fetch_many: one call per batch; `fail` names paths it cannot get."""

    def __init__(self, staging: Path, content: dict[str, bytes], fail: set[str] = frozenset()
                 ) -> None:
        self.staging = staging
        self.content = content
        self.fail = fail
        self.calls: list[list[str]] = []

    async def __call__(self, origin: PeerId, folder: str, items: list[tuple[str, bytes]]
                       ) -> dict[str, object]:
        self.calls.append([p for p, _ in items])
        self.staging.mkdir(exist_ok=True)
        out: dict[str, object] = {}
        for n, (path, _digest) in enumerate(items):
            if path in self.fail:
                out[path] = LocalIOError(f"cannot fetch {path}")
                continue
            f = self.staging / f"{len(self.calls)}-{n}.bin"
            f.write_bytes(self.content[path])
            out[path] = f
        return out


async def test_apply_batch_fetches_many_creates_in_one_call_and_keeps_order(
        tmp_path: Path) -> None:
    content = {f"f{i}.txt": f"v{i}".encode() for i in range(100)}
    content["f5.txt"] = b"second"
    many = FakeFetchMany(tmp_path / "staging", content, fail={"f7.txt"})
    single = FakeFetch(tmp_path / "staging1", {"f5.txt": b"second"})
    eng, _ = engine(tmp_path, single, fetch_many=many)
    ev = Events()
    try:
        creates = [ev("created", f"f{i}.txt", f"v{i}".encode()) for i in range(100)]
        delete = ev("deleted", "f3.txt")
        again = ev("modified", "f5.txt", b"second")
        results = await eng.apply_batch([*creates, delete, again])
        assert [e for e, _ in results] == [*creates, delete, again]  # one outcome each, in order
        outcomes = dict((e.path, o) for e, o in results if e is not delete)
        assert isinstance(outcomes["f7.txt"], LocalIOError)  # one failed file fails alone
        assert all(o is MirrorOutcome.FETCHED for p, o in outcomes.items() if p != "f7.txt")
        assert results[100][1] is MirrorOutcome.VERSIONED  # the delete waited for the fetch
        # 100 creates in one fetch; the delete and the later event for f5 come after it
        assert many.calls[0] == [f"f{i}.txt" for i in range(100)]
        assert many.calls[1:] == [["f5.txt"]] and single.calls == []
        base = tmp_path / "received" / "alice" / "docs"
        assert (base / "f5.txt").read_bytes() == b"second"
        assert not (base / "f3.txt").exists() and not (base / "f7.txt").exists()
        assert (base / "f99.txt").read_bytes() == b"v99"
    finally:
        eng.close()


async def test_apply_batch_refuses_a_fetched_file_that_does_not_match_its_event(
        tmp_path: Path) -> None:
    many = FakeFetchMany(tmp_path / "staging", {"a.txt": b"tampered", "b.txt": b"fine"})
    eng, _ = engine(tmp_path, FakeFetch(tmp_path / "s1", {}), fetch_many=many)
    ev = Events()
    try:
        results = await eng.apply_batch([ev("created", "a.txt", b"announced"),
                                         ev("created", "b.txt", b"fine")])
        assert isinstance(results[0][1], IntegrityError)
        assert results[1][1] is MirrorOutcome.FETCHED
        assert not (tmp_path / "received" / "alice" / "docs" / "a.txt").exists()
    finally:
        eng.close()
