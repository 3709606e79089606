"""Benchmark: two-way folders: a big drop, a 2-byte append, and convergence after chaos.

In ONE run, on 127.0.0.1, three real nodes A, B, C share one send-receive
folder (``bench``; ``folders.json`` written through FolderStore before they
start; all trust each other):

1. drop: ``--files`` small files of 1-10 KB (seeded) and one ``--big-mb`` file
   are renamed into A's folder at once (each appears whole); the clock runs
   until B and C both hold every file with its full content (checked by hash
   after the clock stops). CPU seconds of each node (utime+stime, /proc) over
   the drop.
2. append: 2 bytes are appended to the big file on A; the clock runs until B
   and C hold the new content. "Bytes moved" is the sum of ``bytes_on_wire`` of
   every "serve" transfer of big.bin on any node since the append (B may fetch
   from C); the target is at most one chunk per receiver. A's ``wchar``
   (/proc/PID/io: sockets and its own database writes) is printed beside it.
3. with ``--chaos-seconds S``: scripts/chaos_folders.py with 5 nodes for S
   seconds (its own process); prints its time to converge and lost versions.

``--receivers 1`` runs A and B only (the drop and the append to one peer).

``--vs-share`` instead compares, like for like in one run, the small-file rate
per receiver of a folder and of the one-way ``--share`` path: the same seeded
``--files`` files of 1-10 KB (scripts/bench_smallfiles.py's ``Drop``, flat, no
big file) dropped into A's send-receive folder with one receiver B, then into
A's ``--share`` dir with one receiver B (bench_smallfiles.run_p2pfs). Both
clocks run from the first rename until B holds every file with its full size;
contents are compared after the clock stops.

    .venv/bin/python scripts/bench_folders.py                  # 2,000 files + 200 MB
    .venv/bin/python scripts/bench_folders.py --files 200 --big-mb 20 --json
    .venv/bin/python scripts/bench_folders.py --receivers 1
    .venv/bin/python scripts/bench_folders.py --vs-share       # folder vs --share, 1 peer
    .venv/bin/python scripts/bench_folders.py --chaos-seconds 300

Imports the harness from scripts/ and node.folders.config; never the daemon.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_smallfiles import Drop, measure_drop, run_p2pfs, tree_cpu_s  # noqa: E402
from testnet_lib import Testnet, TestnetError  # noqa: E402

from node.folders.config import FolderConfig, FolderStore  # noqa: E402
from node.identity import PeerId  # noqa: E402
from node.transfer.manifest import DEFAULT_CHUNK_SIZE_BYTES as CHUNK_SIZE  # noqa: E402

FOLDER_ID = "bench"
NAMES = ("A", "B", "C")
POLL_S = 0.05


def _hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no wchar in /proc/{pid}/io")


def _has_all(tree: Path, sizes: dict[str, int]) -> bool:
    for rel, size in sizes.items():
        try:
            if (tree / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _wait(pred: Any, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise TestnetError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="p2pfs-benchfolders-")).resolve()
    try:
        return _run(args, rng, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _folder_net(net: Testnet, work: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Start `names` sharing the send-receive folder FOLDER_ID, warmed up; their trees."""
    net.start_bootstrap()
    net.add_nodes(list(names), start=False)
    trees = {n: work / "trees" / n for n in names}
    for n in names:
        trees[n].mkdir(parents=True)
        for o in names:
            if o != n:
                net.cli(n, "trust", net.peer_id(o), "--name", o, json=False)
        store = FolderStore.load(net.node(n).home)
        store.put(FolderConfig(FOLDER_ID, trees[n], peers=tuple(
            PeerId.parse(net.peer_id(o)) for o in names if o != n)))
        store.save()
    net.start_many(list(names))
    net.wait_all_see_each_other(list(names), timeout=60)
    # warm-up: one file through, so channels and scans are done before the clock
    (trees["A"] / "warm.txt").write_bytes(b"warm")
    _wait(lambda: all(_has_all(trees[n], {"warm.txt": 4}) for n in names[1:]), 60,
          "the warm-up file on the receivers")
    return trees


def _vs_share(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    drop = Drop.make(args.files, args.seed)
    out: dict[str, Any] = {"files": args.files, "seed": args.seed, "bytes": drop.total_bytes}
    with Testnet(work / "folder", transport=args.transport) as net:
        trees = _folder_net(net, work / "folder", ("A", "B"))
        staging = work / "folder" / "staging"
        drop.stage(staging)
        pa, pb = net.node("A").pid, net.node("B").pid
        assert pa is not None and pb is not None
        out["folder"] = {"system": "folder (send-receive, 1 receiver)",
                         **measure_drop(drop, staging, trees["A"], trees["B"], (pa, pb),
                                        args.timeout)}
    out["folder"]["load_avg"] = round(os.getloadavg()[0], 2)
    out["share"] = run_p2pfs(drop, work / "share", args.transport, args.timeout,
                             lambda _msg: None)
    out["share"]["load_avg"] = round(os.getloadavg()[0], 2)
    out["folder_vs_share"] = round(out["folder"]["files_per_s"] / out["share"]["files_per_s"], 2)
    return out


def _run(args: argparse.Namespace, rng: random.Random, work: Path) -> dict[str, Any]:
    if args.vs_share:
        return _vs_share(args, work)
    names = NAMES[:1 + args.receivers]
    receivers = names[1:]
    out: dict[str, Any] = {"files": args.files, "big_mb": args.big_mb, "seed": args.seed,
                           "receivers": len(receivers), "chunk_bytes": CHUNK_SIZE}
    with Testnet(work, transport=args.transport) as net:
        trees = _folder_net(net, work, names)

        staging = work / "staging"
        staging.mkdir()
        sizes: dict[str, int] = {}
        for i in range(args.files):
            rel = f"small/{i // 100:02d}/f{i:05d}.bin"
            data = rng.randbytes(rng.randint(1_000, 10_000))
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
            sizes[rel] = len(data)
        big = staging / "big.bin"
        with open(big, "wb") as f:
            for _ in range(args.big_mb):
                f.write(rng.randbytes(1 << 20))
        sizes["big.bin"] = args.big_mb << 20
        pids = {n: net.node(n).pid for n in names}
        cpu0 = {n: tree_cpu_s(p) for n, p in pids.items() if p}
        t0 = time.monotonic()
        for d in sorted({Path(r).parts[0] for r in sizes}):
            os.replace(staging / d, trees["A"] / d)
        _wait(lambda: all(_has_all(trees[n], sizes) for n in receivers),
              args.timeout, "the drop on the receivers")
        drop_s = time.monotonic() - t0
        cpu1 = {n: tree_cpu_s(p) for n, p in pids.items() if p}
        bad = [f"{n}:{rel}" for n in receivers for rel in sizes
               if _hash(trees[n] / rel) != _hash(trees["A"] / rel)]
        out["drop"] = {"seconds": round(drop_s, 2),
                       "files_per_s": round((args.files + 1) / drop_s, 1),
                       "load_avg": round(os.getloadavg()[0], 2),
                       "cpu_s": {n: round(cpu1[n] - cpu0[n], 2) for n in cpu0},
                       "mismatched": len(bad)}

        a_pid = pids["A"]
        w0 = _wchar(a_pid) if a_pid else 0
        seen = {n: {t["id"] for t in net.cli(n, "transfers")} for n in names}
        t0 = time.monotonic()
        with open(trees["A"] / "big.bin", "ab") as f:
            f.write(b"!\n")
        want = _hash(trees["A"] / "big.bin")
        new_size = sizes["big.bin"] + 2
        _wait(lambda: all(_has_all(trees[n], {"big.bin": new_size}) and
                          _hash(trees[n] / "big.bin") == want for n in receivers),
              args.timeout, "the appended file on the receivers")
        took = time.monotonic() - t0
        written = (_wchar(a_pid) - w0) if a_pid else -1

        def served() -> int:
            return sum(t.get("bytes_on_wire", 0) for n in names for t in net.cli(n, "transfers")
                       if t["id"] not in seen[n] and t.get("direction") == "serve"
                       and any(str(p).endswith("big.bin") for p in t.get("paths", ())))
        moved = served()
        out["append"] = {"seconds": round(took, 2), "bytes_served": moved,
                         "chunks_served": round(moved / CHUNK_SIZE, 2),
                         "target_bytes": len(receivers) * CHUNK_SIZE,
                         "a_wchar_bytes": written}
    if args.chaos_seconds > 0:
        res = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("chaos_folders.py")), "--nodes", "5",
             "--duration", str(args.chaos_seconds), "--seed", str(args.seed), "--json"],
            capture_output=True, text=True, check=False)
        try:
            out["chaos"] = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TestnetError(f"chaos_folders.py failed: {res.stderr.strip()[-500:]}") from None
    out["load_avg"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--big-mb", type=int, default=200)
    p.add_argument("--chaos-seconds", type=float, default=0.0)
    p.add_argument("--receivers", type=int, default=2, choices=(1, 2),
                   help="peers receiving the drop (default 2: B and C)")
    p.add_argument("--vs-share", action="store_true",
                   help="only the small files, 1 receiver: a folder vs the --share path")
    p.add_argument("--timeout", type=float, default=300.0, help="per phase, seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--transport", default="tcp", choices=("tcp", "udp", "quic"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except TestnetError as e:
        print(f"bench_folders: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if args.vs_share:
        for key in ("folder", "share"):
            r = result[key]
            print(f"{r['system']:<36} {r['files']} files: {r['seconds']} s,"
                  f" {r['files_per_s']} files/s, CPU s sender {r['sender_cpu_s']}"
                  f" receiver {r['receiver_cpu_s']} (load {r['load_avg']})")
        print(f"folder / share files/s: {result['folder_vs_share']}")
        return 0
    d, a = result["drop"], result["append"]
    print(f"load {result['load_avg']:.1f}; chunk {result['chunk_bytes']} B")
    print(f"drop of {args.files} small files + {args.big_mb} MB on A -> "
          f"{result['receivers']} receiver(s):"
          f" {d['seconds']} s ({d['files_per_s']} files/s), CPU s"
          f" {', '.join(f'{n} {c}' for n, c in d['cpu_s'].items())}, mismatched {d['mismatched']}")
    print(f"2-byte append: {a['seconds']} s, {a['bytes_served']} B served"
          f" ({a['chunks_served']} chunks; target <= {a['target_bytes']} B);"
          f" A's daemon wrote {a['a_wchar_bytes']} B in all (sockets + its databases)")
    if "chaos" in result:
        c = result["chaos"]
        print(f"chaos {c['duration_s']:.0f} s, {sum(c['ops'].values())} ops"
              f" ({c['ops']['kill']} kills): converged in {c['converged_s']} s,"
              f" {c['conflict_copies']} conflict copies, lost {c['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
