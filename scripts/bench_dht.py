"""Benchmark the hardened DHT: an in-process network of N DhtNodes on 127.0.0.1.

For each N (default 50 and 200) it starts N nodes in one event loop (uvloop when
available), joins each through one random earlier node, publishes every node's
signed contact record, then measures over random (asker, target) pairs:
lookup success rate, hops (median/max), queries, and p50/p99 lookup latency;
and the time for a new node to become findable (start + join through one peer
+ publish, until another node's lookup returns its record).

    .venv/bin/python scripts/bench_dht.py                # table
    .venv/bin/python scripts/bench_dht.py --json         # machine-readable
    .venv/bin/python scripts/bench_dht.py --sizes 200 --lookups 1000

With ``--processes N [N ...]`` it measures real networks instead: a bootstrap
server and N real `node start` processes on 127.0.0.1 (scripts/testnet_lib.Testnet),
then random lookups sent straight to the daemons' control sockets
(node.control.ControlClient, so CLI start-up cost stays out of the latency), and
the time for a new node that knows one peer (no bootstrap server) to become
findable, from spawning its process until another node's lookup returns it.

    .venv/bin/python scripts/bench_dht.py --processes 50 [--lookups 300] [--json]

With ``--fake-contacts F [F ...]`` it measures the fake-contact attack (issue 7): for
each F, a fresh in-process network of ``--honest`` nodes (default 20), then F
sockets on 127.0.0.1 that never answer each send one ping with a random fake node
id to every honest node; then random lookups of real peers, p50/p99, and how many
fake ids made it into any routing table. Target: p99 < 500 ms at F = 1,000.

    .venv/bin/python scripts/bench_dht.py --fake-contacts 0 100 1000 [--lookups 200]

Targets (issue 3): 100 % success, median hops <= log2(N), p99 < 200 ms at N = 200.
Imports dht, node.contact/identity/control/errors and scripts/testnet_lib only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # testnet_lib

from dht.node import DhtNode
from node.contact import ContactRecord
from node.control import ControlClient
from node.errors import P2PError
from node.identity import Identity

HOST = "127.0.0.1"
RPC_TIMEOUT_S = 2.0
# fake-contact mode
FAKE_HONEST_NODES = 20
FAKE_SEND_BATCH = 200  # datagrams sent between yields, so no socket buffer overflows
FAKE_SETTLE_S = 0.2
FAKE_LOOKUP_LIMIT_S = 30.0
FAKE_P99_TARGET_MS = 500.0
FINDABLE_TRIALS = 5
FINDABLE_POLL_S = 0.005
# real-process mode
PROC_START_BATCH = 10
PROC_INIT_THREADS = 6
PROC_STARTUP_TIMEOUT_S = 180.0
PROC_JOIN_TIMEOUT_S = 180.0
PROC_FINDABLE_TRIALS = 3
PROC_FINDABLE_TIMEOUT_S = 60.0
PROC_FINDABLE_POLL_S = 0.05
CONTROL_TIMEOUT_S = 30.0
JOINED_LOG_LINE = "joined the DHT through"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[idx]


def record(node: DhtNode, seq: int = 1) -> ContactRecord:
    return ContactRecord.create(node.identity, [HOST], {"tcp": 7000, "dht": node.port}, seq)


async def new_node(rng: random.Random, seeds: list[DhtNode]) -> DhtNode:
    node = DhtNode(Identity.generate(seed=rng.randbytes(32)), host=HOST, port=0,
                   rpc_timeout_s=RPC_TIMEOUT_S)
    await node.start()
    if seeds:
        seed = rng.choice(seeds)
        await node.bootstrap([(HOST, seed.port)])
    return node


async def run_size(n: int, lookups: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed + n)
    nodes: list[DhtNode] = []
    t0 = time.perf_counter()
    try:
        for _ in range(n):
            nodes.append(await new_node(rng, nodes))
        join_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for node in nodes:
            await node.set_record(record(node))
        publish_s = time.perf_counter() - t1

        ok = 0
        hops: list[int] = []
        queries: list[int] = []
        lat_ms: list[float] = []
        for _ in range(lookups):
            asker, target = rng.sample(nodes, 2)
            t = time.perf_counter()
            res = await asker.lookup(target.identity.peer_id)
            lat_ms.append((time.perf_counter() - t) * 1000)
            if res is not None and res.record == target.record:
                ok += 1
                hops.append(res.hops)
                queries.append(res.queries)

        findable_ms: list[float] = []
        for _ in range(FINDABLE_TRIALS):
            t = time.perf_counter()
            fresh = await new_node(rng, nodes)
            nodes.append(fresh)
            await fresh.set_record(record(fresh))
            asker = rng.choice(nodes[:-1])
            while (await asker.lookup(fresh.identity.peer_id)) is None:
                await asyncio.sleep(FINDABLE_POLL_S)
            findable_ms.append((time.perf_counter() - t) * 1000)
        stats = {k: sum(node.stats[k] for node in nodes) for k in nodes[0].stats}
    finally:
        for node in nodes:
            await node.stop()
    return {
        "nodes": n,
        "lookups": lookups,
        "success_pct": 100.0 * ok / lookups,
        "hops_median": statistics.median(hops) if hops else None,
        "hops_max": max(hops) if hops else None,
        "hops_target": math.log2(n),
        "queries_median": statistics.median(queries) if queries else None,
        "latency_p50_ms": percentile(lat_ms, 50),
        "latency_p99_ms": percentile(lat_ms, 99),
        "findable_median_ms": statistics.median(findable_ms),
        "join_all_s": join_s,
        "publish_all_s": publish_s,
        "rpc_timeouts": stats["rpc_timeouts"],
        "dropped_datagrams": stats["dropped_datagrams"],
    }


def table(rows: list[dict[str, Any]], loop_name: str) -> str:
    head = ("N", "success", "hops med/max", "log2 N", "queries med", "p50 ms", "p99 ms",
            "findable ms")
    lines = [f"DHT benchmark: in-process nodes on {HOST}, loop={loop_name}",
             " | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            str(r["nodes"]), f"{r['success_pct']:.1f} %",
            f"{r['hops_median']}/{r['hops_max']}", f"{r['hops_target']:.1f}",
            f"{r['queries_median']}", f"{r['latency_p50_ms']:.1f}",
            f"{r['latency_p99_ms']:.1f}", f"{r['findable_median_ms']:.0f}",
        ]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# fake contacts (issue 7)


class SilentPeer(asyncio.DatagramProtocol):
    """A socket that sends what it is told and never answers anything.

    With `answer_pings`, it answers pings (so it passes the admission check)
    under `fake_id`, and nothing else: a contact that is alive but useless.
    """

    def __init__(self, fake_id: bytes = b"", answer_pings: bool = False) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.fake_id = fake_id
        self.answer_pings = answer_pings
        self.received = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        from node.wire import packb, unpackb

        self.received += 1
        if not self.answer_pings or self.transport is None or data[:1] != b"\x00":
            return
        try:
            method = unpackb(data[21:], max_bytes=8192)[0]
        except Exception:  # noqa: BLE001  (an attacker does not care)
            return
        if method == "ping":
            self.transport.sendto(b"\x01" + data[1:21] + packb(self.fake_id), addr)


def fake_ping(fake_id: bytes, rng: random.Random) -> bytes:
    from node.wire import packb

    return b"\x00" + rng.randbytes(20) + packb(["ping", [fake_id]])


async def inject_fakes(nodes: list[DhtNode], count: int, rng: random.Random,
                       answer_pings: bool = False
                       ) -> tuple[list[asyncio.DatagramTransport], set[bytes]]:
    """`count` silent sockets, each pinging every node once under its own random id."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.DatagramTransport] = []
    ids: set[bytes] = set()
    sent = 0
    try:
        for _ in range(count):
            fake_id = rng.randbytes(20)
            transport, _proto = await loop.create_datagram_endpoint(
                lambda fid=fake_id: SilentPeer(fid, answer_pings),  # type: ignore[misc]
                local_addr=(HOST, 0))
            transports.append(transport)
            ids.add(fake_id)
            for node in nodes:
                transport.sendto(fake_ping(fake_id, rng), (HOST, node.port))
                sent += 1
                if sent % FAKE_SEND_BATCH == 0:
                    await asyncio.sleep(0.001)
    except BaseException:
        for t in transports:
            t.close()
        raise
    await asyncio.sleep(FAKE_SETTLE_S)
    return transports, ids


async def run_fake_contacts(count: int, honest: int, lookups: int, seed: int,
                            answer_pings: bool = False) -> dict[str, Any]:
    rng = random.Random(seed * 1_000_003 + count)
    nodes: list[DhtNode] = []
    transports: list[asyncio.DatagramTransport] = []
    try:
        for _ in range(honest):
            nodes.append(await new_node(rng, nodes))
        for node in nodes:
            await node.set_record(record(node))
        for node in nodes:  # again, now that everyone is in
            await node.set_record(record(node, seq=2))
        t_inject = time.perf_counter()
        transports, fake_ids = await inject_fakes(nodes, count, rng, answer_pings)
        inject_s = time.perf_counter() - t_inject
        ok = 0
        lat_ms: list[float] = []
        for _ in range(lookups):
            asker, target = rng.sample(nodes, 2)
            t = time.perf_counter()
            try:
                res = await asyncio.wait_for(asker.lookup(target.identity.peer_id),
                                             FAKE_LOOKUP_LIMIT_S)
            except TimeoutError:
                res = None
            lat_ms.append((time.perf_counter() - t) * 1000)
            if res is not None and res.record == target.record:
                ok += 1
        admitted = sum(1 for node in nodes for cid, _ip, _port in node.contact_ids()
                       if cid in fake_ids)
        stats = {k: sum(node.stats[k] for node in nodes) for k in nodes[0].stats}
    finally:
        for fake in transports:
            fake.close()
        for node in nodes:
            await node.stop()
    p99 = percentile(lat_ms, 99)
    return {
        "fake_contacts": count,
        "fakes_answer_pings": answer_pings,
        "honest_nodes": honest,
        "lookups": lookups,
        "success_pct": 100.0 * ok / lookups if lookups else float("nan"),
        "latency_p50_ms": percentile(lat_ms, 50),
        "latency_p99_ms": p99,
        "latency_max_ms": max(lat_ms) if lat_ms else float("nan"),
        "p99_target_ms": FAKE_P99_TARGET_MS,
        "p99_ok": p99 < FAKE_P99_TARGET_MS,
        "fake_ids_in_tables": admitted,
        "inject_s": inject_s,
        "stats": stats,
    }


def fake_table(rows: list[dict[str, Any]], loop_name: str) -> str:
    head = ("fake contacts", "success", "p50 ms", "p99 ms", "max ms", "fakes in tables")
    lines = [f"DHT lookups under fake contacts: {rows[0]['honest_nodes'] if rows else 0} "
             f"in-process nodes on {HOST}, loop={loop_name}, target p99 < "
             f"{FAKE_P99_TARGET_MS:.0f} ms",
             " | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            str(r["fake_contacts"]), f"{r['success_pct']:.1f} %",
            f"{r['latency_p50_ms']:.1f}", f"{r['latency_p99_ms']:.1f}",
            f"{r['latency_max_ms']:.1f}", str(r["fake_ids_in_tables"]),
        ]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# real processes


def _joined(home_log: Path, at_least: int = 1) -> bool:
    try:
        return home_log.read_text(errors="replace").count(JOINED_LOG_LINE) >= at_least
    except OSError:
        return False


def _locked(fn: Any) -> Any:
    lock = threading.Lock()

    def call() -> Any:
        with lock:
            return fn()

    return call


def start_process_network(net: Any, n: int, echo: Any) -> dict[str, float]:
    """Bootstrap server + n nodes (init in parallel, started in batches); all joined."""
    t0 = time.perf_counter()
    net.start_bootstrap(ttl_s=120)
    names = [f"n{i}" for i in range(1, n + 1)]
    # `node init` + `node id` are two CLI runs per node: run them for a few nodes at once
    net.ports.allocate = _locked(net.ports.allocate)
    chunks = [names[i::PROC_INIT_THREADS] for i in range(PROC_INIT_THREADS)]
    with ThreadPoolExecutor(PROC_INIT_THREADS) as pool:
        list(pool.map(lambda c: net.add_nodes(c, start=False), [c for c in chunks if c]))
    init_s = time.perf_counter() - t0
    echo(f"{n} nodes initialised in {init_s:.1f} s")
    t1 = time.perf_counter()
    for i in range(0, n, PROC_START_BATCH):
        net.start_many(names[i:i + PROC_START_BATCH])
        echo(f"{min(n, i + PROC_START_BATCH)}/{n} nodes ready")
    ready_s = time.perf_counter() - t1
    for name in names:
        log = net.node(name).node_log
        net.wait_until(lambda log=log: _joined(log), PROC_JOIN_TIMEOUT_S, interval=0.5,
                       what=f"{name} joined the DHT")
    joined_s = time.perf_counter() - t1
    echo(f"all {n} nodes joined the DHT {joined_s:.1f} s after the first start")
    return {"init_all_s": init_s, "ready_all_s": ready_s, "joined_all_s": joined_s}


async def _lookup(home: Path, peer_id: str) -> tuple[dict[str, Any] | None, float, str]:
    """(reply or None, control round trip ms, error text)."""
    t = time.perf_counter()
    try:
        res = await ControlClient(home).call("lookup", {"peer": peer_id},
                                             timeout_s=CONTROL_TIMEOUT_S)
    except (P2PError, OSError, TimeoutError) as exc:
        return None, (time.perf_counter() - t) * 1000, f"{type(exc).__name__}: {exc}"
    return res, (time.perf_counter() - t) * 1000, ""


async def measure_process_lookups(net: Any, names: list[str], lookups: int,
                                  rng: random.Random) -> dict[str, Any]:
    ok = 0
    hops: list[int] = []
    queries: list[int] = []
    dht_ms: list[float] = []
    rtt_ms: list[float] = []
    errors: dict[str, int] = {}
    for _ in range(lookups):
        asker, target = rng.sample(names, 2)
        want = net.node(target)
        res, rtt, err = await _lookup(net.node(asker).home, net.peer_id(target))
        rtt_ms.append(rtt)
        rec = res.get("record") if res else None
        if (isinstance(rec, dict) and rec.get("name") == target
                and rec.get("ports", {}).get("dht") == want.ports["dht"]):
            ok += 1
            hops.append(int(res["hops"]))  # type: ignore[index]
            queries.append(int(res["queries"]))  # type: ignore[index]
            dht_ms.append(float(res["elapsed_ms"]))  # type: ignore[index]
        else:
            key = err.split(":")[0] if err else "wrong record"
            errors[key] = errors.get(key, 0) + 1
    return {
        "lookups": lookups,
        "success_pct": 100.0 * ok / lookups,
        "hops_median": statistics.median(hops) if hops else None,
        "hops_max": max(hops) if hops else None,
        "queries_median": statistics.median(queries) if queries else None,
        "latency_p50_ms": percentile(dht_ms, 50),
        "latency_p99_ms": percentile(dht_ms, 99),
        "control_rtt_p50_ms": percentile(rtt_ms, 50),
        "control_rtt_p99_ms": percentile(rtt_ms, 99),
        "failures": errors,
    }


async def measure_process_findable(net: Any, names: list[str], trial: int,
                                   rng: random.Random) -> dict[str, float]:
    """Spawn a node that knows one peer (no bootstrap URL); time until another finds it."""
    name = f"new{trial}"
    seed, asker = rng.sample(names, 2)
    (h,) = net.add_nodes([name], bootstrap=False, bootstrap_peers=[seed], start=False)
    peer_id = net.peer_id(name)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    starting = loop.run_in_executor(None, net.start, name)
    ready_ms: float | None = None
    try:
        deadline = t0 + PROC_FINDABLE_TIMEOUT_S
        while time.perf_counter() < deadline:
            if ready_ms is None:
                try:
                    await ControlClient(h.home).call("status", timeout_s=CONTROL_TIMEOUT_S)
                    ready_ms = (time.perf_counter() - t0) * 1000
                except P2PError:
                    pass
            if ready_ms is not None:
                res, _rtt, _err = await _lookup(net.node(asker).home, peer_id)
                if res is not None and res["record"]["name"] == name:
                    found_ms = (time.perf_counter() - t0) * 1000
                    return {"spawn_to_findable_ms": found_ms, "spawn_to_ready_ms": ready_ms,
                            "ready_to_findable_ms": found_ms - ready_ms}
            await asyncio.sleep(PROC_FINDABLE_POLL_S)
        raise TimeoutError(f"{name} not findable from {asker} within {PROC_FINDABLE_TIMEOUT_S} s")
    finally:
        await starting


async def run_processes(n: int, lookups: int, seed: int, root: Path | None,
                        echo: Any) -> dict[str, Any]:
    from testnet_lib import Testnet

    rng = random.Random(seed + n)
    with contextlib.ExitStack() as stack:
        base = root or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-dht-")))
        net = stack.enter_context(Testnet(base / f"n{n}", startup_timeout_s=PROC_STARTUP_TIMEOUT_S))
        loop = asyncio.get_running_loop()
        timings = await loop.run_in_executor(None, start_process_network, net, n, echo)
        names = [f"n{i}" for i in range(1, n + 1)]
        echo(f"running {lookups} lookups")
        row = await measure_process_lookups(net, names, lookups, rng)
        findable = []
        for trial in range(1, PROC_FINDABLE_TRIALS + 1):
            findable.append(await measure_process_findable(net, names, trial, rng))
            echo(f"new node {trial} findable after "
                 f"{findable[-1]['spawn_to_findable_ms']:.0f} ms from spawn")
    return {
        "nodes": n,
        "mode": "processes",
        **row,
        "hops_target": math.log2(n),
        "findable_median_ms": statistics.median(f["ready_to_findable_ms"] for f in findable),
        "findable_from_spawn_median_ms": statistics.median(
            f["spawn_to_findable_ms"] for f in findable),
        "findable_trials": findable,
        **timings,
    }


def process_table(rows: list[dict[str, Any]], loop_name: str) -> str:
    head = ("N", "success", "hops med/max", "log2 N", "queries med", "p50 ms", "p99 ms",
            "ctl p50/p99 ms", "findable ms", "from spawn ms", "all joined s")
    lines = [f"DHT benchmark: real node processes on {HOST}, client loop={loop_name}",
             " | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            str(r["nodes"]), f"{r['success_pct']:.1f} %",
            f"{r['hops_median']}/{r['hops_max']}", f"{r['hops_target']:.1f}",
            f"{r['queries_median']}", f"{r['latency_p50_ms']:.1f}",
            f"{r['latency_p99_ms']:.1f}",
            f"{r['control_rtt_p50_ms']:.1f}/{r['control_rtt_p99_ms']:.1f}",
            f"{r['findable_median_ms']:.0f}", f"{r['findable_from_spawn_median_ms']:.0f}",
            f"{r['joined_all_s']:.1f}",
        ]))
        if r["failures"]:
            lines.append(f"  failures: {r['failures']}")
    lines.append("p50/p99: DHT lookup time inside the daemon; ctl: round trip through the "
                 "control socket; findable: from the new node answering on its control "
                 "socket until another node's lookup returns its record")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--processes", type=int, nargs="+", metavar="N",
                    help="measure networks of N real `node start` processes instead")
    ap.add_argument("--dir", type=Path, help="keep the real-process testnets' homes and logs here")
    ap.add_argument("--fake-contacts", type=int, nargs="+", metavar="F",
                    help="measure lookups after F never-answering fake contacts were injected")
    ap.add_argument("--answer-pings", action="store_true",
                    help="in --fake-contacts mode, fakes answer pings (and nothing else)")
    ap.add_argument("--honest", type=int, default=FAKE_HONEST_NODES,
                    help="honest nodes in --fake-contacts mode")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args()
    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
            loop_name = "uvloop"
        except ImportError:
            pass

    def echo(msg: str) -> None:
        if args.verbose:
            print(f"[bench_dht {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    async def all_sizes() -> list[dict[str, Any]]:
        if args.fake_contacts is not None:
            return [await run_fake_contacts(f, args.honest, args.lookups, args.seed,
                                            args.answer_pings)
                    for f in args.fake_contacts]
        if args.processes:
            return [await run_processes(n, args.lookups, args.seed, args.dir, echo)
                    for n in args.processes]
        return [await run_size(n, args.lookups, args.seed) for n in args.sizes]

    rows = asyncio.run(all_sizes())
    mode = ("fake-contacts" if args.fake_contacts is not None
            else "processes" if args.processes else "in-process")
    if args.json:
        print(json.dumps({"loop": loop_name, "mode": mode, "results": rows}, indent=2))
    elif mode == "fake-contacts":
        print(fake_table(rows, loop_name))
    else:
        print(process_table(rows, loop_name) if args.processes else table(rows, loop_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
