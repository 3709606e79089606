"""The pure gossip engine: N engines wired in memory, simulated loss, partitions, forgery."""

from __future__ import annotations

import heapq
import random

import pytest

from node.errors import ProtocolError
from node.gossip.engine import (
    PUSH_BATCH_MAX,
    RELAY_ONLY_PUSH_BURST,
    RELAY_ONLY_PUSH_PER_S,
    Accept,
    Beat,
    Digest,
    Events,
    GossipEngine,
    PresenceChanged,
    Push,
    Reject,
    Send,
)
from node.gossip.events import ChangeEvent, Heartbeat
from node.gossip.log import EventLog
from node.identity import Identity, PeerId

H = b"h" * 32


class Sim:
    """N engines; messages delivered after a random latency, dropped with probability `loss`."""

    def __init__(self, n: int, *, seed: int = 1, loss: float = 0.0, fanout: int = 3,
                 anti_entropy_s: float = 1.0, trusted: set[PeerId] | None = None) -> None:
        self.rand = random.Random(seed)
        self.ids = [Identity.generate(name=f"n{i}", seed=bytes([i + 1]) * 32) for i in range(n)]
        self.logs = [EventLog(":memory:") for _ in range(n)]
        self.by_id = {ident.peer_id: i for i, ident in enumerate(self.ids)}
        self.trusted = trusted
        self.engines = [
            GossipEngine(ident.peer_id, self.logs[i], fanout=fanout,
                         rand=random.Random(seed * 1000 + i), anti_entropy_s=anti_entropy_s,
                         is_trusted=(lambda p: True) if trusted is None
                         else (lambda p, t=trusted: p in t))
            for i, ident in enumerate(self.ids)
        ]
        for e in self.engines:
            e.set_peers([i.peer_id for i in self.ids])
        self.loss = loss
        self.now = 0.0
        self.queue: list[tuple[float, int, int, int, bytes]] = []
        self._n = 0
        self.blocked: set[tuple[int, int]] = set()
        self.accepted: list[list[Accept]] = [[] for _ in range(n)]
        self.rejected: list[list[Reject]] = [[] for _ in range(n)]
        self.messages = 0

    def handle(self, src: int, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                dst = self.by_id[a.peer]
                self.messages += 1
                if (src, dst) in self.blocked or self.rand.random() < self.loss:
                    continue
                self._n += 1
                heapq.heappush(self.queue, (self.now + self.rand.uniform(0.001, 0.02), self._n,
                                            src, dst, a.msg.encode()))
            elif isinstance(a, Accept):
                self.accepted[src].append(a)
            elif isinstance(a, Reject):
                self.rejected[src].append(a)

    def publish(self, i: int, path: str, kind: str = "created") -> ChangeEvent:
        ev = self.logs[i].append_local(self.ids[i], kind=kind, folder="f", path=path,
                                       size=1, hash=H)
        self.handle(i, self.engines[i].publish(ev, self.now))
        return ev

    def run(self, seconds: float, tick_s: float = 0.1) -> None:
        end = self.now + seconds
        next_tick = self.now
        while self.now < end:
            if self.queue and self.queue[0][0] <= next_tick:
                t, _, src, dst, data = heapq.heappop(self.queue)
                self.now = t
                self.handle(dst, self.engines[dst].receive(self.ids[src].peer_id, data, t))
            else:
                self.now = next_tick
                for i, e in enumerate(self.engines):
                    self.handle(i, e.tick(self.now))
                next_tick += tick_s

    def run_until_quiet(self, limit: float = 5.0) -> None:
        """Deliver queued messages only (no ticks => no anti-entropy)."""
        while self.queue:
            t, _, src, dst, data = heapq.heappop(self.queue)
            self.now = t
            self.handle(dst, self.engines[dst].receive(self.ids[src].peer_id, data, t))
            assert self.now < limit + 1e9

    def partition(self, a: set[int], b: set[int]) -> None:
        self.blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}


def test_push_alone_spreads_and_dedups_without_loss() -> None:
    sim = Sim(20, fanout=4)
    ev = sim.publish(0, "a.txt")
    sim.run_until_quiet()
    have = [log.has(ev.id) for log in sim.logs]
    # the origin pushes to every peer of a 20-node mesh: push alone reaches all
    assert all(have)
    for i in range(20):
        assert len([a for a in sim.accepted[i] if a.event.id == ev.id]) <= 1
    # messages: the origin's 19 plus at most `fanout` per relaying node
    assert sim.messages <= 19 + 20 * 4


def test_every_event_reaches_every_node_despite_loss() -> None:
    sim = Sim(30, loss=0.2, seed=7)
    events = [sim.publish(sim.rand.randrange(30), f"dir/file{k}.txt") for k in range(12)]
    sim.run(15.0)
    for log in sim.logs:
        for ev in events:
            assert log.has(ev.id)
    for i in range(30):
        ids = [a.event.id for a in sim.accepted[i]]
        assert len(ids) == len(set(ids))  # never accepted twice
    assert not any(sim.rejected)


def test_partitioned_nodes_catch_up_with_batches() -> None:
    sim = Sim(8, seed=3)
    left, right = set(range(4)), set(range(4, 8))
    sim.partition(left, right)
    # more events than one anti-entropy batch holds, so the "more" loop is exercised
    for k in range(300):
        sim.publish(k % 2, f"left/{k}")
    sim.publish(5, "right/1")
    sim.run(3.0)
    assert sim.logs[6].count() == 1 and sim.logs[2].count() == 300
    sim.blocked = set()
    sim.run(10.0)
    assert all(log.count() == 301 for log in sim.logs)
    assert sim.logs[7].highest_seqs() == sim.logs[0].highest_seqs()


def test_gap_in_push_triggers_pull() -> None:
    sim = Sim(2)
    a, b = sim.ids[0], sim.ids[1]
    evs = [sim.logs[0].append_local(a, kind="created", folder="f", path=f"p{k}", size=1,
                                    hash=H) for k in range(3)]
    # b gets only seq 3 pushed: it notices the gap and pulls 1..2 at once, no ticks needed
    sim.handle(1, sim.engines[1].receive(a.peer_id, Push((evs[2].encode(),)).encode(), 0.0))
    sim.run_until_quiet()
    assert sim.logs[1].highest_seqs()[a.peer_id.key] == 3
    assert all(sim.logs[1].has(e.id) for e in evs)
    assert b.peer_id  # two distinct nodes


def _engine(trusted: bool = True) -> tuple[GossipEngine, EventLog, Identity, Identity]:
    me, other = Identity.generate(), Identity.generate()
    log = EventLog(":memory:")
    eng = GossipEngine(me.peer_id, log, rand=random.Random(0),
                       is_trusted=lambda p: trusted)
    third = Identity.generate()
    eng.set_peers([other.peer_id, third.peer_id])
    return eng, log, me, other


def _event(ident: Identity, seq: int = 1, path: str = "x.txt", **kw) -> ChangeEvent:
    return ChangeEvent.create(ident, folder="f", seq=seq, lamport=seq, kind="created",
                              path=path, size=1, hash=H, **kw)


def test_duplicate_push_is_accepted_once() -> None:
    eng, log, _me, other = _engine()
    blob = Push((_event(other).encode(),)).encode()
    first = eng.receive(other.peer_id, blob, 0.0)
    second = eng.receive(other.peer_id, blob, 1.0)
    assert [type(a) for a in first].count(Accept) == 1
    assert second == []
    assert log.count() == 1


def test_forged_signature_rejected_not_stored_not_relayed() -> None:
    eng, log, _me, other = _engine()
    ev = _event(other)
    forged = ChangeEvent(*ev.to_wire_fields()[:-1], bytes(64))
    actions = eng.receive(other.peer_id, Push((forged.encode(),)).encode(), 0.0)
    assert len(actions) == 1 and isinstance(actions[0], Reject)
    assert "signature" in actions[0].reason
    assert log.count() == 0
    assert log.rejected()[0]["reason"].endswith("bad signature")
    # an event altered after signing (path changed) is a forgery too
    altered = ChangeEvent(ev.origin, ev.folder, ev.seq, ev.lamport, ev.wall_ms, ev.kind,
                          "other.txt", "", ev.size, ev.hash, ev.signature)
    actions = eng.receive(other.peer_id, Push((altered.encode(),)).encode(), 0.0)
    assert [type(a) for a in actions] == [Reject]


def test_reused_sequence_number_rejected_and_logged() -> None:
    eng, log, _me, other = _engine()
    eng.receive(other.peer_id, Push((_event(other, path="a").encode(),)).encode(), 0.0)
    actions = eng.receive(other.peer_id, Push((_event(other, path="b").encode(),)).encode(), 0.0)
    assert [type(a) for a in actions] == [Reject]
    assert "reused" in actions[0].reason
    assert log.count() == 1
    assert [e.path for e in log.query()] == ["a"]
    assert "reused" in log.rejected()[0]["reason"]


def test_untrusted_origin_is_relayed_but_not_acted_on() -> None:
    eng, log, _me, other = _engine(trusted=False)
    actions = eng.receive(other.peer_id, Push((_event(other).encode(),)).encode(), 0.0)
    accepts = [a for a in actions if isinstance(a, Accept)]
    assert len(accepts) == 1 and accepts[0].trusted is False
    assert any(isinstance(a, Send) for a in actions)  # relayed onward
    assert log.query() == []  # not shown in `node log`
    assert len(log.query(include_relay_only=True)) == 1


def test_malformed_messages_raise_protocol_error() -> None:
    eng, _log, _me, other = _engine()
    with pytest.raises(ProtocolError):
        eng.receive(other.peer_id, b"\x93garbage", 0.0)
    too_many = Push.__new__(Push)
    object.__setattr__(too_many, "events", tuple(b"x" for _ in range(PUSH_BATCH_MAX + 1)))
    with pytest.raises(ProtocolError):
        eng.receive(other.peer_id, too_many.encode(), 0.0)
    bad_digest = Digest.__new__(Digest)
    object.__setattr__(bad_digest, "origins", ((b"short", 1),))
    object.__setattr__(bad_digest, "reply", True)
    with pytest.raises(ProtocolError):
        eng.receive(other.peer_id, bad_digest.encode(), 0.0)


def test_oversize_event_inside_push_is_rejected() -> None:
    eng, log, _me, other = _engine()
    ev = _event(other)
    wire = ev.to_wire()
    wire[6] = "a/" * 600  # path over the bound
    from node.wire import packb
    actions = eng.receive(other.peer_id, Push((packb(wire),)).encode(), 0.0)
    assert [type(a) for a in actions] == [Reject]
    assert log.count() == 0


def test_presence_join_and_leave() -> None:
    eng, _log, me, other = _engine()
    hb = Heartbeat.create(other)
    actions = eng.receive(other.peer_id, Beat(hb.encode()).encode(), 100.0)
    joined = [a for a in actions if isinstance(a, PresenceChanged)]
    assert joined and joined[0].online and joined[0].peer == other.peer_id
    # heartbeats go straight to peers and are not relayed (3N/period messages per node)
    assert not any(isinstance(a, Send) for a in actions)
    sent = eng.publish_heartbeat(Heartbeat.create(me), 100.0)
    assert len(sent) == 2  # both peers directly
    assert all(isinstance(a, Send) and isinstance(a.msg, Beat) for a in sent)
    # a replayed (same or older) heartbeat changes nothing
    assert eng.receive(other.peer_id, Beat(hb.encode()).encode(), 101.0) == []
    assert eng.presence()[other.peer_id][0] == 100.0
    left = [a for a in eng.tick(100.0 + eng.presence_timeout_s + 1)
            if isinstance(a, PresenceChanged)]
    assert left and left[0].online is False
    # a forged heartbeat is refused
    forged = Heartbeat(other.peer_id, hb.wall_ms + 10, hb.name, bytes(64))
    actions = eng.receive(other.peer_id, Beat(forged.encode()).encode(), 200.0)
    assert [type(a) for a in actions] == [Reject]


# -- relay caps: a trusted peer relaying a flood from 200 untrusted origins -------------

STRANGERS = [Identity.generate(seed=bytes([201, i]) * 16) for i in range(200)]


def _small_caps(monkeypatch) -> None:
    for name, value in (("EVENTS_PER_ORIGIN", 8), ("EVENTS_TOTAL", 64), ("ORIGINS", 16)):
        monkeypatch.setattr(f"node.gossip.log.RELAY_ONLY_MAX_{name}", value)


def _relay_held(log: EventLog) -> tuple[int, int]:
    return log._db.execute("SELECT COUNT(*), COALESCE(SUM(length(raw)), 0) FROM events"
                           " WHERE relay_only=1").fetchone()


def test_pushed_flood_from_200_untrusted_origins_is_capped(monkeypatch) -> None:
    _small_caps(monkeypatch)
    relay, origin, me = Identity.generate(), Identity.generate(), Identity.generate()
    log = EventLog(":memory:")
    eng = GossipEngine(me.peer_id, log, rand=random.Random(0),
                       is_trusted=lambda p: p in (relay.peer_id, origin.peer_id))
    eng.set_peers([relay.peer_id, Identity.generate().peer_id])
    relayed = 0  # each accepted event is pushed to the one peer that is not `relay`
    for s in range(1, 13):
        for stranger in STRANGERS:
            actions = eng.receive(relay.peer_id, Push((_event(stranger, s).encode(),)).encode(),
                                  float(s))
            relayed += sum(isinstance(a, Send) for a in actions)
            assert not any(isinstance(a, Accept) and a.trusted for a in actions)
        eng.receive(relay.peer_id, Push((_event(origin, s).encode(),)).encode(), float(s))
    n, _size = _relay_held(log)
    assert n <= 64 and log.stats().relay_only_events == n
    # pushed onward at most at the untrusted relay rate (11 s of it plus the burst),
    # not once per event (2,400)
    assert 0 < relayed <= RELAY_ONLY_PUSH_BURST + 11 * RELAY_ONLY_PUSH_PER_S + 1
    assert eng.stats["relay_throttled"] >= 200 * 12 - relayed
    # the trusted origin lost nothing
    assert [e.seq for e in log.query(peer=origin.peer_id)] == list(range(1, 13))
    # a pruned event pushed again is neither stored nor relayed
    again = eng.receive(Identity.generate().peer_id,
                        Push((_event(STRANGERS[0], 1).encode(),)).encode(), 99.0)
    assert again == [] and not log.has(_event(STRANGERS[0], 1).id)


def _pump(a: GossipEngine, b: GossipEngine, first: list, budget: int = 10_000) -> list:
    """Deliver `first` (actions of `a`) and everything it causes; returns every Send."""
    by_id = {a.self_id: a, b.self_id: b}
    queue = [(a.self_id, x) for x in first if isinstance(x, Send)]
    sent = []
    while queue:
        src, send = queue.pop(0)
        sent.append(send)
        assert len(sent) < budget, "anti-entropy never settles"
        dst = by_id[send.peer]
        queue += [(dst.self_id, x) for x in dst.receive(src, send.msg.encode(), 0.0)
                  if isinstance(x, Send)]
    return sent


def _events_in(sent: list, origins: set[PeerId]) -> int:
    return sum(1 for s in sent if isinstance(s.msg, Events) for blob in s.msg.events
               if ChangeEvent.decode(blob).origin in origins)


def test_anti_entropy_respects_the_caps_and_never_re_pulls_pruned_events(monkeypatch) -> None:
    _small_caps(monkeypatch)
    origin = Identity.generate()
    # the relay trusts all 200 strangers, so it holds their whole history uncapped
    r_id, n_id = Identity.generate(name="relay"), Identity.generate(name="node")
    r_log, n_log = EventLog(":memory:"), EventLog(":memory:")
    for stranger in STRANGERS:
        for s in range(1, 16):
            r_log.add(_event(stranger, s))
    for s in range(1, 301):
        r_log.add(_event(origin, s))
    relay = GossipEngine(r_id.peer_id, r_log, rand=random.Random(1))
    node = GossipEngine(n_id.peer_id, n_log, rand=random.Random(2),
                        is_trusted=lambda p: p in (r_id.peer_id, origin.peer_id))
    relay.set_peers([n_id.peer_id])
    node.set_peers([r_id.peer_id])
    strangers = {s.peer_id for s in STRANGERS}
    pulled, ids = [], []
    for _round in range(25):
        sent = _pump(node, relay, [Send(r_id.peer_id, node._digest(reply=False))])
        pulled.append(_events_in(sent, strangers))
        ids += [blob for s in sent if isinstance(s.msg, Events) for blob in s.msg.events]
        assert _relay_held(n_log)[0] <= 64
    # the trusted origin's 300 events came in the first exchange, 200 x 15 untrusted
    # events in the relay's log notwithstanding (fair shares, follow-ups while trusted)
    assert [e.seq for e in n_log.query(peer=origin.peer_id, limit=1000)] == list(range(1, 301))
    # untrusted events: at most one batch per exchange, each pulled once, then nothing:
    # every stranger is remembered at its high-water mark, so what the caps pruned is
    # never pulled again
    assert max(pulled) <= 256
    assert pulled[-5:] == [0] * 5
    assert len(ids) == len(set(ids)) and sum(pulled) <= 200 * 15
    assert n_log.stats().relay_only_origins_remembered == 200


def test_a_batch_of_2000_local_events_goes_out_in_pushes_of_64_each_verifiable() -> None:
    me, peer = Identity.generate(), Identity.generate()
    log = EventLog(":memory:")
    eng = GossipEngine(me.peer_id, log, rand=random.Random(0))
    eng.set_peers([peer.peer_id])
    events = log.append_local_many(me, "f", [("created", f"d/f{i}.bin", i, H, "")
                                            for i in range(2000)])
    assert [e.seq for e in events] == list(range(1, 2001))  # one seq each, contiguous
    assert log.highest_seqs()[me.peer_id.key] == 2000
    sends = [a for a in eng.publish_many(events, 0.0) if isinstance(a, Send)]
    assert len(sends) == -(-2000 // PUSH_BATCH_MAX)  # 32 messages, not 2,000
    assert all(isinstance(s.msg, Push) and len(s.msg.events) <= PUSH_BATCH_MAX for s in sends)
    # the peer validates every event on its own (signature, seq) and accepts all of them
    rlog = EventLog(":memory:")
    receiver = GossipEngine(peer.peer_id, rlog, rand=random.Random(0))
    accepted = []
    for s in sends:
        accepted += [a for a in receiver.receive(me.peer_id, s.msg.encode(), 0.0)
                     if isinstance(a, Accept)]
    assert len(accepted) == 2000 and rlog.count() == 2000
    assert rlog.highest_seqs()[me.peer_id.key] == 2000
    # the next single event continues the sequence
    nxt = log.append_local(me, kind="created", folder="f", path="z", size=1, hash=H)
    assert nxt.seq == 2001


def test_log_batch_commits_once_and_a_failed_add_undoes_only_itself() -> None:
    eng, log, _me, other = _engine()
    good = [_event(other, seq=i, path=f"p{i}") for i in (1, 2, 3)]
    reused = _event(other, seq=2, path="different")  # (origin, seq) reused: refused
    with log.batch():
        for ev in (good[0], good[1], reused, good[2]):
            eng.receive(other.peer_id, Push((ev.encode(),)).encode(), 0.0)
        assert log._db.in_transaction  # nothing committed yet: one commit for the batch
    assert not log._db.in_transaction
    assert log.count() == 3 and log.highest_seqs()[other.peer_id.key] == 3


def test_a_goodbye_shows_the_peer_offline_at_once() -> None:
    eng, _log, _me, other = _engine()
    hb = Heartbeat.create(other, wall_ms=1_000)
    eng.receive(other.peer_id, Beat(hb.encode()).encode(), 100.0)
    assert eng.presence()[other.peer_id][1] is True
    bye = Heartbeat.create(other, wall_ms=2_000, leaving=True)
    actions = eng.receive(other.peer_id, Beat(bye.encode()).encode(), 101.0)
    left = [a for a in actions if isinstance(a, PresenceChanged)]
    # offline now, not presence_timeout_s later
    assert left and left[0].online is False and left[0].peer == other.peer_id
    assert eng.presence()[other.peer_id][1] is False
    # a goodbye older than the newest heartbeat (a replay) changes nothing
    eng.receive(other.peer_id, Beat(Heartbeat.create(other, wall_ms=3_000).encode()).encode(),
                102.0)
    assert eng.receive(other.peer_id, Beat(bye.encode()).encode(), 103.0) == []
    assert eng.presence()[other.peer_id][1] is True
