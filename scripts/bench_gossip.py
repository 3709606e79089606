"""Benchmark: N GossipService nodes in one process over real TCP sockets on 127.0.0.1.

Each node has its own Ed25519 identity, SQLite event log (temp dir) and TCP
listener; channels are the real authenticated SecureChannel (node/channel.py
handshake + AEAD frames) unless ``--plain`` is given. Each node's peer list is a
random symmetric view of about ``--view`` peers (as in a deployment, where a
node gossips with its trusted peers; full membership for 200 nodes would mean
~40,000 sockets in one process). Presence heartbeats are disabled during the
measurement so the numbers are about events only.

For each measured event: one random node publishes it; we record when each
node accepts it and report the time to reach 50 %, 99 % and 100 % of nodes
(median and worst over the events), the delivery ratio, and the messages sent
per event per node (push vs anti-entropy).

Usage:
    .venv/bin/python scripts/bench_gossip.py                 # N=200, table
    .venv/bin/python scripts/bench_gossip.py --nodes 50 --events 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.channel import accept_channel, open_channel
from node.errors import P2PError
from node.gossip.engine import DEFAULT_FANOUT
from node.gossip.events import ChangeEvent
from node.gossip.log import EventLog
from node.gossip.service import GossipService
from node.identity import Identity, PeerId
from node.transports import tcp
from node.transports.base import Pipe

HOST = "127.0.0.1"
H = b"\x42" * 32


class PlainChannel:
    """Unauthenticated framing over a TCP pipe (--plain): peer id sent in the first frame."""

    def __init__(self, pipe: Pipe, peer: PeerId) -> None:
        self.pipe = pipe
        self.peer = peer

    async def send(self, data: bytes) -> None:
        await self.pipe.send(data)

    async def recv(self) -> bytes:
        return await self.pipe.recv()

    async def close(self) -> None:
        await self.pipe.close()


class Node:
    def __init__(self, i: int, home: Path, args: argparse.Namespace, bench: Bench) -> None:
        self.i = i
        self.identity = Identity.generate(name=f"n{i}")
        self.log = EventLog(home / f"n{i}.db")
        self.bench = bench
        self.args = args
        self.view: list[PeerId] = []
        self.port = 0
        self.listener: Any = None
        self.service = GossipService(
            self.identity, self.log, peers=lambda: self.view, open_channel=self.open,
            is_trusted=lambda p: True, on_event=self.on_event, fanout=args.fanout,
            anti_entropy_s=args.anti_entropy_s, heartbeat_s=3600.0,
            rand=random.Random(args.seed * 7919 + i))
        self.service.accept_listeners.append(self.accepted)
        self.tasks: set[asyncio.Task[None]] = set()

    async def on_event(self, _ev: ChangeEvent) -> None:
        return None

    def accepted(self, ev: ChangeEvent, _trusted: bool) -> None:
        self.bench.arrivals.setdefault(ev.id, {})[self.i] = time.perf_counter()

    async def listen(self) -> None:
        self.listener = await tcp.listen(HOST, 0, self.on_pipe)
        self.port = self.listener.port

    async def on_pipe(self, pipe: Pipe) -> None:
        try:
            if self.args.plain:
                peer = PeerId(await pipe.recv())
                ch: Any = PlainChannel(pipe, peer)
            else:
                ch = await accept_channel(pipe, self.identity, authorize=lambda p: None)
        except P2PError:
            await pipe.close()
            return
        await self.service.handle_channel(ch)

    async def open(self, peer: PeerId) -> Any:
        port = self.bench.ports[peer]
        pipe = await tcp.connect(HOST, port)
        if self.args.plain:
            await pipe.send(self.identity.peer_id.key)
            return PlainChannel(pipe, peer)
        return await open_channel(pipe, self.identity, expected_peer=peer,
                                  authorize=lambda p: None)


class Bench:
    def __init__(self, args: argparse.Namespace, home: Path) -> None:
        self.args = args
        self.arrivals: dict[bytes, dict[int, float]] = {}
        self.nodes = [Node(i, home, args, self) for i in range(args.nodes)]
        self.ports: dict[PeerId, int] = {}
        self.failed_connects = 0

    def build_views(self) -> None:
        rand = random.Random(self.args.seed)
        n = len(self.nodes)
        links: list[set[int]] = [set() for _ in range(n)]
        for i in range(n):
            for j in rand.sample([k for k in range(n) if k != i], min(self.args.view // 2, n - 1)):
                links[i].add(j)
                links[j].add(i)
        for i, node in enumerate(self.nodes):
            node.view = [self.nodes[j].identity.peer_id for j in sorted(links[i])]
        # the view graph must be connected, or 100 % delivery is impossible by construction
        seen, stack = {0}, [0]
        while stack:
            for j in links[stack.pop()]:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        assert len(seen) == n, "view graph is not connected; raise --view"

    async def start(self) -> None:
        for node in self.nodes:
            await node.listen()
            self.ports[node.identity.peer_id] = node.port
        self.build_views()
        for node in self.nodes:
            await node.service.start()
        # open every view link up front, a few handshakes at a time, so the
        # measurement is about gossip and not about a storm of handshakes
        sem = asyncio.Semaphore(self.args.connect_parallel)

        async def connect(node: Node, peer: PeerId) -> bool:
            async with sem:
                return await node.service.connect(peer)

        results = await asyncio.gather(*(connect(node, p) for node in self.nodes
                                         for p in node.view if p > node.identity.peer_id))
        self.failed_connects = results.count(False)

    async def stop(self) -> None:
        for node in self.nodes:
            await node.service.stop()
        for node in self.nodes:
            await node.listener.close()
            node.log.close()

    def sent_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node in self.nodes:
            for k, v in node.service.engine.stats.items():
                if k.startswith("sent"):
                    out[k] = out.get(k, 0) + v
            out["dropped"] = out.get("dropped", 0) + node.service.stats()["dropped"]
        return out

    async def one_event(self, k: int, timeout_s: float) -> tuple[list[float], int]:
        n = len(self.nodes)
        origin = random.Random(self.args.seed + 1000 + k).randrange(n)
        t0 = time.perf_counter()
        ev = await self.nodes[origin].service.publish_local("modified", "bench", f"f{k}.bin",
                                                            1, H)
        self.arrivals.setdefault(ev.id, {})[origin] = t0
        deadline = t0 + timeout_s
        while len(self.arrivals[ev.id]) < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.002)
        times = sorted(t - t0 for t in self.arrivals[ev.id].values())
        return times, len(times)


def pct_time(times: list[float], n: int, frac: float) -> float | None:
    need = max(1, int(-(-frac * n // 1)))  # ceil
    return times[need - 1] if len(times) >= need else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gossip-") as tmp:
        bench = Bench(args, Path(tmp))
        t_setup = time.perf_counter()
        await bench.start()
        try:
            # warm-up: open channels (handshakes) so the measurement is about gossip
            for k in range(args.warmup):
                await bench.one_event(10_000 + k, args.timeout_s)
            setup_s = time.perf_counter() - t_setup
            before = bench.sent_totals()
            t_meas = time.perf_counter()
            cpu0 = time.process_time()
            reach: dict[str, list[float]] = {"p50": [], "p99": [], "p100": []}
            delivered = 0
            per_event: list[int] = []
            for k in range(args.events):
                times, got = await bench.one_event(k, args.timeout_s)
                delivered += got
                per_event.append(got)
                for key, frac in (("p50", 0.5), ("p99", 0.99), ("p100", 1.0)):
                    v = pct_time(times, args.nodes, frac)
                    reach[key].append(args.timeout_s if v is None else v)
                await asyncio.sleep(args.gap_s)
            window_s = time.perf_counter() - t_meas
            cpu_s = time.process_time() - cpu0
            after = bench.sent_totals()
        finally:
            await bench.stop()
    sent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    per_event_node = {k: v / args.events / args.nodes for k, v in sent.items()}
    n_total = args.events * args.nodes
    return {
        "nodes": args.nodes,
        "events": args.events,
        "fanout": args.fanout,
        "view": args.view,
        "anti_entropy_s": args.anti_entropy_s,
        "channel": "plain-tcp" if args.plain else "secure-tcp",
        "delivery_ratio": delivered / n_total,
        "reached_per_event": per_event,
        # an event that missed a node within --timeout-s counts as taking the timeout
        "reach_ms": {k: {"median": statistics.median(v) * 1000, "max": max(v) * 1000}
                     for k, v in reach.items()},
        "msgs_per_event_per_node": {
            "total": per_event_node.get("sent", 0.0),
            "push": per_event_node.get("sent_push", 0.0),
            "anti_entropy": per_event_node.get("sent_digest", 0.0)
            + per_event_node.get("sent_events", 0.0),
        },
        "anti_entropy_rounds_per_node_per_s": (sent.get("sent_digest", 0) / args.nodes
                                               / window_s) if window_s else 0.0,
        "setup_s": setup_s,
        # all N nodes share one Python thread: this is the CPU the whole swarm spends
        "cpu_ms_per_event_all_nodes": cpu_s / args.events * 1000,
        "dropped_sends": sent.get("dropped", 0),
        "failed_connects": bench.failed_connects,
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"gossip benchmark: N={r['nodes']} services in one process, {r['channel']}, "
          f"fanout={r['fanout']}, view~{r['view']}, anti-entropy every "
          f"{r['anti_entropy_s']:g} s, {r['events']} events")
    print(f"{'metric':<38}{'median':>12}{'worst':>12}")
    for key, label in (("p50", "reach 50 % of nodes (ms)"), ("p99", "reach 99 % of nodes (ms)"),
                       ("p100", "reach 100 % of nodes (ms)")):
        v = r["reach_ms"][key]
        print(f"{label:<38}{v['median']:>12.1f}{v['max']:>12.1f}")
    m = r["msgs_per_event_per_node"]
    print(f"{'delivery ratio':<38}{r['delivery_ratio']:>12.4f}")
    print(f"{'msgs/event/node: total':<38}{m['total']:>12.2f}")
    print(f"{'msgs/event/node: push':<38}{m['push']:>12.2f}")
    print(f"{'msgs/event/node: anti-entropy':<38}{m['anti_entropy']:>12.2f}")
    print(f"{'CPU per event, all nodes (ms)':<38}{r['cpu_ms_per_event_all_nodes']:>12.1f}")
    print(f"{'setup incl. handshakes + warm-up (s)':<38}{r['setup_s']:>12.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fanout", type=int, default=DEFAULT_FANOUT)
    ap.add_argument("--view", type=int, default=16)
    ap.add_argument("--anti-entropy-s", type=float, default=2.0)
    ap.add_argument("--gap-s", type=float, default=0.1)
    ap.add_argument("--timeout-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connect-parallel", type=int, default=16)
    ap.add_argument("--plain", action="store_true", help="plain TCP framing, no SecureChannel")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="log INFO to stderr")
    args = ap.parse_args()
    if args.verbose:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    if args.uvloop:
        import uvloop
        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
