"""Benchmark of the transfer layer in one process: source and sink in one event loop.

    python -m node.transfer.bench [--size-mib 256] [--runs 3] [--channel memory,tcp] [--json]

Prints MiB/s (median of runs, wall time including the sink's fsyncs but not the
sender's manifest hashing, which is cached after the first run), MiB per CPU-second
of the whole process (both sides, all threads: steadier on a loaded machine) and the process's
peak RSS, which covers *both* sides together. ``memory`` is the in-memory channel
pair (protocol + hashing + disk cost only); ``tcp`` is a real SecureChannel over
TCP on 127.0.0.1 (adds the encryption and the socket). The process-to-process
benchmark per transport is scripts/bench_transfer.py.

A tool, not a library: it may import the channel and the TCP transport; nothing
in the project imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from node.memory_channel import memory_channel_pair
from node.transfer.manifest import build_manifest
from node.transfer.session import TransferState, receive_files, send_files
from node.transfer.store import ReceiveStore

MiB = 1 << 20


@asynccontextmanager
async def tcp_channel_pair() -> AsyncIterator[tuple[Any, Any]]:
    """(source end, sink end): a real SecureChannel over TCP on 127.0.0.1, port 0."""
    from node.channel import accept_channel, open_channel
    from node.identity import Identity
    from node.transports import tcp

    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(pipe: Any) -> None:
        try:
            ch = await accept_channel(pipe, bob, authorize=lambda peer: None)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting side
            accepted.set_exception(exc)
            return
        accepted.set_result(ch)
        await done.wait()

    listener = await tcp.listen("127.0.0.1", 0, handler)
    try:
        pipe = await tcp.connect("127.0.0.1", listener.port)
        a = await open_channel(pipe, alice, expected_peer=bob.peer_id, authorize=lambda peer: None)
        b = await accepted
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()
            done.set()
    finally:
        await listener.close()


async def one_run(kind: str, src: Path, recv: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, all threads) for one transfer."""
    c0 = time.process_time()
    wall = await _one_run(kind, src, recv)
    return wall, time.process_time() - c0


async def _one_run(kind: str, src: Path, recv: Path) -> float:
    shutil.rmtree(recv, ignore_errors=True)
    if kind == "memory":
        a, b = memory_channel_pair("alice", "bob")
        t0 = time.perf_counter()
        r_src, r_sink = await asyncio.gather(send_files(a, src, [src]),
                                             receive_files(b, ReceiveStore(recv)))
        elapsed = time.perf_counter() - t0
    else:
        async with tcp_channel_pair() as (a, b):
            t0 = time.perf_counter()
            r_src, r_sink = await asyncio.gather(send_files(a, src, [src]),
                                                 receive_files(b, ReceiveStore(recv)))
            elapsed = time.perf_counter() - t0
    if r_sink.state is not TransferState.DONE or r_src.state is not TransferState.DONE:
        raise SystemExit(f"transfer failed: {r_sink.error or r_src.error}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channel", default="memory,tcp")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        with open(src / "payload.bin", "wb") as f:
            f.writelines(os.urandom(MiB) for _ in range(args.size_mib))
        t0 = time.perf_counter()
        build_manifest(src, [src])
        manifest_s = time.perf_counter() - t0
        for kind in args.channel.split(","):
            runs = [asyncio.run(one_run(kind, src, Path(tmp) / "recv"))
                    for _ in range(args.runs)]
            med = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            rows.append({"channel": kind, "size_mib": args.size_mib, "runs": args.runs,
                         "median_s": round(med, 3), "mib_per_s": round(args.size_mib / med, 1),
                         "mib_per_cpu_s": round(args.size_mib / cpu, 1),
                         "peak_rss_mib": round(
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    manifest_rate = round(args.size_mib / manifest_s, 1)
    if args.json:
        json.dump({"manifest_mib_per_s": manifest_rate, "rows": rows}, sys.stdout, indent=2)
        print()
    else:
        print(f"manifest hashing: {manifest_rate} MiB/s")
        print(f"{'channel':<8} {'size MiB':>9} {'median s':>9} {'MiB/s':>8} {'MiB/CPU-s':>10} "
              f"{'peak RSS MiB':>13}")
        for r in rows:
            print(f"{r['channel']:<8} {r['size_mib']:>9} {r['median_s']:>9} {r['mib_per_s']:>8} "
                  f"{r['mib_per_cpu_s']:>10} {r['peak_rss_mib']:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
