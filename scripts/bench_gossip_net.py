"""Benchmark: one change event spreading through N real node processes (gossip + notify).

Starts a bootstrap server and N `node start` processes on 127.0.0.1 through
scripts/testnet_lib.py (default N = 20), all trusting each other (trust.db is
written directly with node.trust.TrustStore before the daemons start: N*(N-1)
`node trust` calls would take minutes). Node n1 shares one folder. After a
warm-up change (its spread is reported as "cold": it includes the channel
handshakes), each trial saves one new file in n1's shared folder and reads
every node's notifications (`node events --json`) afterwards. All processes
share one clock, so a notification's `at_ms` minus the moment the benchmark
saved the file is that node's save-to-notification time; no node is polled
while the event spreads.

Reported per run (medians over the trials, worst for 100 %):
* save -> n1's own event (watcher debounce + BLAKE3 + signing);
* save -> notification on 50 %, 99 % and 100 % of the other N-1 nodes
  (for N = 20, 99 % of 19 nodes is all 19), and the same from the event's
  signing time (gossip only);
* save -> notification p50 on direct peers (nodes that got the push from n1);
* delivery ratio;
* messages sent per event per node: gossip pushes (from `node status --json`
  "gossip" counters, summed over all nodes) and, separately, the background
  anti-entropy (digest + events) and heartbeat messages per node per second.

Usage:
    .venv/bin/python scripts/bench_gossip_net.py                  # N=20, 5 trials, table
    .venv/bin/python scripts/bench_gossip_net.py --nodes 30 --trials 8 --json

Importable: ``run_benchmark(...) -> dict`` and ``format_table(result) -> str``
(scripts/bench_gossip.py calls them for its real-process part). Imports
testnet_lib and node.trust / node.identity (to write trust.db) only; it must
not import the daemon.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
for _p in (str(SCRIPTS_DIR), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from testnet_lib import Testnet, normalize_peer_id  # noqa: E402

from node.identity import PeerId  # noqa: E402
from node.trust import TrustStore  # noqa: E402

DEFAULT_NODES = 20
DEFAULT_TRIALS = 5
JOIN_TIMEOUT_S = 120.0
SETTLE_S = 2.0  # wait after a save before reading notifications (no polling during spread)
DELIVERY_TIMEOUT_S = 30.0
TRIAL_GAP_S = 1.0
CLI_WORKERS = 4
SHARED_FOLDER = "benchdocs"
TARGET_P99_MS = 300.0
TARGET_SAVE_TO_NOTIFY_P50_MS = 300.0


# -- network set-up -----------------------------------------------------------------------


def build_network(net: Testnet, n: int, share_dir: Path, echo: Callable[[str], None]) -> list[str]:
    names = [f"n{i}" for i in range(1, n + 1)]
    net.start_bootstrap(ttl_s=60)
    t0 = time.monotonic()
    net.add_node(names[0], share=[share_dir], start=False)
    net.add_nodes(names[1:], start=False)
    echo(f"{n} nodes initialised in {time.monotonic() - t0:.1f} s")
    ids = {name: PeerId.parse(net.peer_id(name)) for name in names}
    for a in names:
        store = TrustStore.in_home(net.node(a).home)
        try:
            for b in names:
                if b != a:
                    store.trust(ids[b], b)
        finally:
            store.close()
    t0 = time.monotonic()
    net.start_many(names)
    echo(f"{n} nodes started in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    parallel(net, names, lambda name: net.wait_until(
        lambda: net.sees(name, [o for o in names if o != name]), JOIN_TIMEOUT_S, 1.0,
        what=f"{name} lists every other node"))
    echo(f"every node lists the {n - 1} others after {time.monotonic() - t0:.1f} s")
    return names


def parallel(net: Testnet, names: list[str], fn: Callable[[str], Any]) -> dict[str, Any]:
    with ThreadPoolExecutor(CLI_WORKERS) as pool:
        return dict(zip(names, pool.map(fn, names), strict=True))


def read_notes(net: Testnet, name: str, since: int) -> list[dict[str, Any]]:
    res = net.cli(name, "events", "--json", "--since", str(since), json=False)
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def gossip_stats(net: Testnet, names: list[str]) -> dict[str, dict[str, int]]:
    def one(name: str) -> dict[str, int]:
        status = net.cli(name, "status")
        stats = status.get("gossip") if isinstance(status, dict) else None
        return {k: int(v) for k, v in (stats or {}).items()}

    return parallel(net, names, one)


# -- one trial ---------------------------------------------------------------------------


def run_trial(net: Testnet, names: list[str], share_dir: Path, rel: str,
              since: dict[str, int]) -> dict[str, Any]:
    """Save `rel` on names[0]; return per-node notification times (ms after the save)."""
    origin = normalize_peer_id(net.peer_id(names[0]))
    target = share_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    saved_ms = time.time() * 1000
    target.write_bytes(f"{rel} saved at {saved_ms:.0f}\n".encode())
    time.sleep(SETTLE_S)
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        missing = [n for n in names if n not in found]

        def look(name: str) -> dict[str, Any] | None:
            for note in read_notes(net, name, since[name]):
                d = note.get("data") or {}
                if (note.get("kind") == "file_shared" and d.get("path") == rel
                        and d.get("folder") == SHARED_FOLDER
                        and normalize_peer_id(str(d.get("origin", ""))) == origin):
                    return note
            return None

        for name, note in parallel(net, missing, look).items():
            if note is not None:
                found[name] = note
        if len(found) == len(names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    local = found.get(names[0])
    wall_ms = float(local["data"]["wall_ms"]) if local else math.nan
    others: dict[str, float] = {}
    from_sign: dict[str, float] = {}
    direct: list[float] = []
    for name in names[1:]:
        note = found.get(name)
        if note is None:
            continue
        others[name] = note["at_ms"] - saved_ms
        from_sign[name] = note["at_ms"] - wall_ms
        if normalize_peer_id(str(note["data"].get("via", ""))) == origin:
            direct.append(note["at_ms"] - saved_ms)
    for name, note in found.items():
        since[name] = max(since[name], int(note["id"]))
    return {
        "path": rel,
        "local_event_ms": (local["at_ms"] - saved_ms) if local else None,
        "delivered": len(others),
        "expected": len(names) - 1,
        "reach_ms": reach(sorted(others.values()), len(names) - 1),
        "reach_from_sign_ms": reach(sorted(from_sign.values()), len(names) - 1),
        "direct_ms": sorted(direct),
        "per_node_ms": {k: round(v, 1) for k, v in sorted(others.items())},
    }


def reach(times_ms: list[float], expected: int) -> dict[str, float | None]:
    """Time by which 50 %, 99 %, 100 % of `expected` nodes had it (None: never)."""
    out: dict[str, float | None] = {}
    for label, frac in (("p50", 0.5), ("p99", 0.99), ("p100", 1.0)):
        k = max(1, math.ceil(frac * expected))
        out[label] = round(times_ms[k - 1], 1) if len(times_ms) >= k else None
    return out


# -- the benchmark -----------------------------------------------------------------------


def run_benchmark(nodes: int = DEFAULT_NODES, trials: int = DEFAULT_TRIALS,
                  transport: str = "tcp", root: Path | None = None,
                  echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start N real nodes, measure `trials` events, tear everything down; return results."""
    say = echo or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="bench-gossip-net-") as tmp:
        base = Path(root) if root else Path(tmp)
        share_dir = base / "data" / SHARED_FOLDER
        share_dir.mkdir(parents=True, exist_ok=True)
        t_setup = time.monotonic()
        with Testnet(base / "net", transport=transport, echo=say) as net:
            names = build_network(net, nodes, share_dir, say)
            since = {n: 0 for n in names}
            setup_s = time.monotonic() - t_setup
            say("warm-up event (opens the gossip channels)")
            cold = run_trial(net, names, share_dir, "warmup.txt", since)
            time.sleep(TRIAL_GAP_S)
            before = gossip_stats(net, names)
            t_stats = time.monotonic()
            results = []
            for i in range(trials):
                results.append(run_trial(net, names, share_dir, f"trial-{i:03d}.txt", since))
                r = results[-1]
                say(f"trial {i + 1}/{trials}: {r['delivered']}/{r['expected']} nodes, "
                    f"reach p50/p99/p100 {r['reach_ms']} ms")
                time.sleep(TRIAL_GAP_S)
            after = gossip_stats(net, names)
            elapsed_s = time.monotonic() - t_stats
    return summarize(nodes, trials, transport, cold, results, before, after, elapsed_s,
                     setup_s)


def _delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
           key: str) -> int:
    return sum(after.get(n, {}).get(key, 0) - before.get(n, {}).get(key, 0) for n in after)


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 1) if vals else None


def summarize(nodes: int, trials: int, transport: str, cold: dict[str, Any],
              results: list[dict[str, Any]], before: dict[str, dict[str, int]],
              after: dict[str, dict[str, int]], elapsed_s: float,
              setup_s: float) -> dict[str, Any]:
    delivered = sum(r["delivered"] for r in results)
    expected = sum(r["expected"] for r in results)
    worst_100 = [r["reach_ms"]["p100"] for r in results]
    direct_all = [v for r in results for v in r["direct_ms"]]
    pushes = _delta(before, after, "sent_push")
    anti = _delta(before, after, "sent_digest") + _delta(before, after, "sent_events")
    beats = _delta(before, after, "sent_beat")
    p99 = _median([r["reach_ms"]["p99"] for r in results])
    s2n = round(statistics.median(direct_all), 1) if direct_all else None
    return {
        "benchmark": "gossip_net",
        "nodes": nodes,
        "trials": trials,
        "transport": transport,
        "setup_s": round(setup_s, 1),
        "delivery_ratio": round(delivered / expected, 4) if expected else None,
        "save_to_local_event_ms_p50": _median([r["local_event_ms"] for r in results]),
        "reach_ms": {
            "p50": _median([r["reach_ms"]["p50"] for r in results]),
            "p99": p99,
            "p100": _median(worst_100),
            "p100_worst": max((v for v in worst_100 if v is not None), default=None)
            if all(v is not None for v in worst_100) else None,
        },
        "reach_from_sign_ms": {
            k: _median([r["reach_from_sign_ms"][k] for r in results])
            for k in ("p50", "p99", "p100")
        },
        "save_to_notification_direct_peer_ms_p50": s2n,
        "direct_peers_per_event": _median([float(len(r["direct_ms"])) for r in results]),
        "cold": {"delivered": cold["delivered"], "expected": cold["expected"],
                 "reach_ms": cold["reach_ms"]},
        "messages": {
            "push_per_event_per_node": round(pushes / (trials * nodes), 2) if trials else None,
            "anti_entropy_per_node_per_s": round(anti / (nodes * elapsed_s), 3),
            "heartbeats_per_node_per_s": round(beats / (nodes * elapsed_s), 3),
            "window_s": round(elapsed_s, 1),
        },
        "targets": {
            "delivery_100pct": expected > 0 and delivered == expected,
            "p99_reach_lt_300ms": p99 is not None and p99 < TARGET_P99_MS,
            "save_to_notification_p50_lt_300ms": s2n is not None
            and s2n < TARGET_SAVE_TO_NOTIFY_P50_MS,
        },
        "trial_details": results,
    }


def format_table(res: dict[str, Any]) -> str:
    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    m = res["messages"]
    rows = [
        ("nodes (real processes)", str(res["nodes"])),
        ("trials (events measured)", str(res["trials"])),
        ("delivery", f"{res['delivery_ratio'] * 100:.1f} %" if res["delivery_ratio"] is not None
         else "-"),
        ("save -> own event on n1 (p50)", ms(res["save_to_local_event_ms_p50"])),
        ("save -> 50 % of nodes notified", ms(res["reach_ms"]["p50"])),
        ("save -> 99 % of nodes notified", ms(res["reach_ms"]["p99"])),
        ("save -> 100 % of nodes notified", ms(res["reach_ms"]["p100"])),
        ("  worst trial, 100 %", ms(res["reach_ms"]["p100_worst"])),
        ("signed -> 50/99/100 % (gossip only)",
         " / ".join(ms(res["reach_from_sign_ms"][k]) for k in ("p50", "p99", "p100"))),
        ("save -> notification, direct peer p50",
         ms(res["save_to_notification_direct_peer_ms_p50"])),
        ("cold first event: 100 %", ms(res["cold"]["reach_ms"]["p100"])),
        ("push msgs per event per node", str(m["push_per_event_per_node"])),
        ("anti-entropy msgs per node per s", str(m["anti_entropy_per_node_per_s"])),
        ("heartbeat msgs per node per s", str(m["heartbeats_per_node_per_s"])),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"gossip over {res['nodes']} real node processes ({res['transport']})",
             f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    t = res["targets"]
    lines.append("targets: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in t.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    ap.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    ap.add_argument("--transport", default="tcp", choices=("tcp", "udp", "quic"))
    ap.add_argument("--dir", type=Path, default=None, help="keep the testnet (logs) here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.nodes < 2 or args.trials < 1:
        ap.error("need --nodes >= 2 and --trials >= 1")

    def echo(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    res = run_benchmark(args.nodes, args.trials, args.transport, args.dir, echo)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0 if all(res["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
