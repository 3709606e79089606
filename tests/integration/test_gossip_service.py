"""GossipService instances over in-memory channels: spread, trust, catch-up, rejection, presence."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

from node.errors import PeerUnreachable
from node.gossip.engine import Push
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.gossip.service import GossipService
from node.identity import Identity, PeerId
from node.memory_channel import MemoryChannel, channel_pair

H = b"\x05" * 32


class Net:
    def __init__(self, tmp_path: Path, n: int, *, untrusted: set[int] = frozenset(),
                 heartbeat_s: float = 0.2,
                 trust: Callable[[int, PeerId], bool] | None = None) -> None:
        self.trust = trust
        self.ids = [Identity.generate(name=f"n{i}", seed=bytes([i + 1]) * 32) for i in range(n)]
        self.pids = [i.peer_id for i in self.ids]
        self.idx = {p: i for i, p in enumerate(self.pids)}
        self.untrusted = {self.pids[i] for i in untrusted}
        self.logs = [EventLog(tmp_path / f"n{i}.db") for i in range(n)]
        self.applied: list[list[ChangeEvent]] = [[] for _ in range(n)]
        self.online = [False] * n
        self.tasks: set[asyncio.Task] = set()
        self.services = [self._make(i, heartbeat_s) for i in range(n)]

    def _make(self, i: int, heartbeat_s: float) -> GossipService:
        async def on_event(ev: ChangeEvent) -> None:
            self.applied[i].append(ev)

        return GossipService(
            self.ids[i], self.logs[i],
            peers=lambda: [p for p in self.pids if p != self.pids[i]],
            open_channel=lambda peer: self.open(i, peer),
            is_trusted=(lambda p: p not in self.untrusted) if self.trust is None
            else (lambda p, t=self.trust: t(i, p)),
            on_event=on_event, fanout=2, anti_entropy_s=0.2, heartbeat_s=heartbeat_s,
            rand=random.Random(i), connect_timeout_s=1.0, send_timeout_s=1.0)

    async def open(self, src: int, peer: PeerId) -> MemoryChannel:
        dst = self.idx[peer]
        if not self.online[dst]:
            raise PeerUnreachable(f"{peer.short} is offline")
        mine, theirs = channel_pair(self.pids[src], peer)
        task = asyncio.create_task(self.services[dst].handle_channel(theirs))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return mine

    async def start(self, *which: int) -> None:
        for i in which or range(len(self.services)):
            self.online[i] = True
            await self.services[i].start()

    async def stop(self, *which: int) -> None:
        for i in which or range(len(self.services)):
            self.online[i] = False
            await self.services[i].stop()

    async def close(self) -> None:
        await self.stop()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for log in self.logs:
            log.close()


async def until(cond, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_event_reaches_all_and_is_acted_on(tmp_path: Path) -> None:
    net = Net(tmp_path, 5)
    await net.start()
    try:
        ev = await net.services[0].publish_local("created", "docs", "a.txt", 3, H)
        await until(lambda: all(log.has(ev.id) for log in net.logs))
        await until(lambda: all(len(a) == 1 for a in net.applied[1:]))
        assert net.applied[0] == []  # our own event is not synced onto ourselves
        kinds = [n.kind for n in net.logs[3].notifications()]
        assert "file_shared" in kinds
        own = net.logs[0].notifications()
        assert own[0].kind == "file_shared" and own[0].data["local"] is True
        assert [e.path for e in net.logs[4].query()] == ["a.txt"]
        # presence rides the same gossip
        await until(lambda: len(net.services[2].presence()) == 4)
        assert "peer_joined" in [n.kind for n in net.logs[2].notifications()]
    finally:
        await net.close()


async def test_appliers_registered_after_construction_get_the_batches(tmp_path: Path
                                                                       ) -> None:
    """The daemon builds gossip first and hands accepted events to the --share mirror
    with on_accepted (the mirror needs gossip to publish, gossip needs the mirror)."""
    net = Net(tmp_path, 2)
    batches: list[list[ChangeEvent]] = []

    async def on_events(events: list[ChangeEvent]) -> None:
        batches.append(events)

    async def never(_ev: ChangeEvent) -> None:
        raise AssertionError("on_events is given: events come in batches")

    net.services[1].on_accepted(never, on_events)
    await net.start()
    try:
        ev = await net.services[0].publish_local("created", "docs", "a.txt", 3, H)
        await until(lambda: [e.id for b in batches for e in b] == [ev.id])
        assert net.applied[1] == []  # the constructor's applier was replaced
    finally:
        await net.close()


async def test_untrusted_origin_relayed_not_applied(tmp_path: Path) -> None:
    net = Net(tmp_path, 4, untrusted={3})
    await net.start()
    try:
        ev = await net.services[3].publish_local("created", "docs", "spam.txt", 3, H)
        await until(lambda: all(log.has(ev.id) for log in net.logs))
        await asyncio.sleep(0.3)
        for i in range(3):
            assert net.applied[i] == []
            assert net.logs[i].query() == []  # not in `node log`
            assert not any(n.kind == "file_shared" for n in net.logs[i].notifications())
    finally:
        await net.close()


async def test_stopped_node_catches_up_after_restart(tmp_path: Path) -> None:
    net = Net(tmp_path, 4)
    await net.start()
    await net.stop(3)
    try:
        evs = [await net.services[i % 3].publish_local("modified", "docs", f"f{i}", 1, H)
               for i in range(20)]
        await until(lambda: all(net.logs[i].has(e.id) for i in range(3) for e in evs))
        assert net.logs[3].count() == 0
        # restart: a fresh service on the same log file pulls everything by anti-entropy
        net.services[3] = net._make(3, 0.2)
        await net.start(3)
        await until(lambda: all(net.logs[3].has(e.id) for e in evs))
        await until(lambda: len(net.applied[3]) == 20)
    finally:
        await net.close()


async def test_forged_and_garbage_input_rejected(tmp_path: Path) -> None:
    net = Net(tmp_path, 3)
    await net.start(0, 1)
    try:
        evil = net.ids[2]
        mine, theirs = channel_pair(evil.peer_id, net.pids[0])
        task = asyncio.create_task(net.services[0].handle_channel(theirs))
        good = ChangeEvent.create(net.ids[1], folder="docs", seq=1, lamport=1, kind="created",
                                  path="x", size=1, hash=H)
        forged = ChangeEvent(good.origin, good.folder, good.seq, good.lamport, good.wall_ms,
                             good.kind, "other", "", good.size, good.hash, good.signature)
        await mine.send(Push((forged.encode(),)).encode())
        await until(lambda: any(n.kind == "event_rejected"
                                for n in net.logs[0].notifications()))
        assert net.logs[0].count() == 0 and net.logs[1].count() == 0  # not stored, not relayed
        await mine.send(b"\x00garbage")
        await asyncio.wait_for(task, 2.0)  # the service closed that channel
        assert len([n for n in net.logs[0].notifications() if n.kind == "event_rejected"]) == 2
        # and the node keeps serving everyone else
        ev = await net.services[1].publish_local("created", "docs", "ok", 1, H)
        await until(lambda: net.logs[0].has(ev.id))
        await mine.close()
    finally:
        await net.close()


async def test_unreachable_peer_does_not_stall_others(tmp_path: Path) -> None:
    net = Net(tmp_path, 4, heartbeat_s=5.0)

    async def hang(peer: PeerId) -> MemoryChannel:
        await asyncio.sleep(60)
        raise AssertionError

    await net.start()
    await net.stop(3)
    net.services[0]._open_channel = lambda p: hang(p) if p == net.pids[3] else net.open(0, p)
    try:
        ev = await net.services[0].publish_local("created", "docs", "a", 1, H)
        await until(lambda: net.logs[1].has(ev.id) and net.logs[2].has(ev.id), timeout=3.0)
    finally:
        await net.close()


async def test_rejection_flood_is_rate_limited(tmp_path: Path) -> None:
    net = Net(tmp_path, 2, heartbeat_s=5.0)
    await net.start(0)
    try:
        evil = net.ids[1]
        mine, theirs = channel_pair(evil.peer_id, net.pids[0])
        task = asyncio.create_task(net.services[0].handle_channel(theirs))
        for k in range(50):
            bad = ChangeEvent.create(evil, folder="docs", seq=k + 1, lamport=1,
                                     kind="created", path=f"p{k}", size=1, hash=H)
            forged = ChangeEvent(bad.origin, bad.folder, bad.seq, bad.lamport, bad.wall_ms,
                                 bad.kind, "x", "", bad.size, bad.hash, bad.signature)
            await mine.send(Push((forged.encode(),)).encode())
        await until(lambda: len(net.logs[0].rejected(limit=100)) == 50)
        notes = [n for n in net.logs[0].notifications() if n.kind == "event_rejected"]
        assert len(notes) == 20
        await mine.close()
        await asyncio.wait_for(task, 2.0)
    finally:
        await net.close()


async def test_relay_flood_from_untrusted_origins_is_capped_and_settles(tmp_path: Path,
                                                                        monkeypatch) -> None:
    """Node 0 trusts 200 strangers and holds their history; node 1 trusts only node 0
    and one origin. Node 1 stores the strangers' events within its caps, gets every
    trusted event, and its anti-entropy with node 0 settles: nothing is pulled again."""
    for name, value in (("EVENTS_PER_ORIGIN", 8), ("EVENTS_TOTAL", 64), ("ORIGINS", 16)):
        monkeypatch.setattr(f"node.gossip.log.RELAY_ONLY_MAX_{name}", value)
    strangers = [Identity.generate(seed=bytes([202, i]) * 16) for i in range(200)]
    origin = Identity.generate(name="origin")
    net: Net

    def trust(i: int, p: PeerId) -> bool:
        return i == 0 or p in (net.pids[0], origin.peer_id)

    net = Net(tmp_path, 2, heartbeat_s=5.0, trust=trust)
    for s in range(1, 16):
        for stranger in strangers:
            net.logs[0].add(ChangeEvent.create(stranger, folder="f", seq=s, lamport=s,
                                               kind="created", path=f"p{s}", size=1, hash=H))
    for s in range(1, 41):
        net.logs[0].add(ChangeEvent.create(origin, folder="f", seq=s, lamport=s,
                                           kind="created", path=f"t{s}", size=1, hash=H))
    await net.start()
    try:
        await until(lambda: len(net.applied[1]) == 40)
        assert [e.seq for e in net.applied[1]] == list(range(1, 41))
        relay, node = net.services
        # settled: ten more digests from node 1 are answered with no events at all
        loop = asyncio.get_running_loop()
        end = loop.time() + 15.0
        while True:
            sent = relay.stats().get("sent_events", 0)
            asked = node.stats().get("sent_digest", 0)
            await until(lambda a=asked: node.stats().get("sent_digest", 0) >= a + 10)
            if relay.stats().get("sent_events", 0) == sent:
                break
            assert loop.time() < end, "anti-entropy keeps pulling untrusted events"
        st = node.stats()
        assert st["log_relay_only_events"] <= 64 and st["log_relay_only_origins"] <= 16
        assert st["log_relay_only_origins_remembered"] == 200
        assert net.logs[1].count() == 40 + st["log_relay_only_events"]
    finally:
        await net.close()


async def test_stop_returns_even_if_a_task_swallows_one_cancellation(tmp_path: Path) -> None:
    """Python 3.11's wait_for can swallow a cancel when the awaited send completes at
    the same moment; the writer then waited on its outbox again and stop() hung."""
    net = Net(tmp_path, 2, heartbeat_s=5.0)
    await net.start(0)
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # what the 3.11 race does
        await asyncio.Event().wait()

    link = net.services[0]._link(net.pids[1])
    link.writer = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    writer = link.writer
    stopping = asyncio.create_task(net.services[0].stop())
    try:
        await asyncio.wait({stopping}, timeout=5.0)  # (asyncio.wait never cancels)
        assert stopping.done(), "stop() hangs on a task that swallowed a cancellation"
        assert swallowed.is_set() and writer.done()
    finally:
        for task in (writer, writer, stopping):
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        await net.close()
