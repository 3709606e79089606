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

Targets (issue 3): 100 % success, median hops <= log2(N), p99 < 200 ms at N = 200.
Real-process networks are measured on top of scripts/testnet.py, not here.
Imports dht and node.contact/identity only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dht.node import DhtNode
from node.contact import ContactRecord
from node.identity import Identity

HOST = "127.0.0.1"
RPC_TIMEOUT_S = 2.0
FINDABLE_TRIALS = 5
FINDABLE_POLL_S = 0.005


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()
    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
            loop_name = "uvloop"
        except ImportError:
            pass

    async def all_sizes() -> list[dict[str, Any]]:
        return [await run_size(n, args.lookups, args.seed) for n in args.sizes]

    rows = asyncio.run(all_sizes())
    if args.json:
        print(json.dumps({"loop": loop_name, "results": rows}, indent=2))
    else:
        print(table(rows, loop_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
