"""Throughput of one UDP-transport pipe over 127.0.0.1 (no encryption), as a table or --json.

    .venv/bin/python scripts/bench_udp.py [--mib 128] [--sizes 1452,60000] [--loss 0,1,5]
                                          [--message-kib 256] [--runs 1] [--json] [--uvloop]

Sender and receiver run in one process and one event loop (as bench_channel.py
does), so the figure includes both ends' per-datagram Python work. Loss is
simulated by the transport's ``loss_rate`` on both directions' outgoing datagrams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from node.transports import udp


async def one_run(total_bytes: int, datagram_bytes: int, loss: float,
                  message_bytes: int) -> dict[str, float]:
    done = asyncio.get_running_loop().create_future()
    received = 0

    async def handler(pipe: udp.UdpPipe) -> None:
        nonlocal received
        while received < total_bytes:
            received += len(await pipe.recv())
        await pipe.send(b"done")
        done.set_result(time.perf_counter())
        await asyncio.sleep(0.2)

    listener = await udp.listen("127.0.0.1", 0, handler, datagram_bytes=datagram_bytes,
                                loss_rate=loss, preauth=False)  # raw pipe: no handshake
    pipe = await udp.connect("127.0.0.1", listener.port, datagram_bytes=datagram_bytes,
                             loss_rate=loss)
    msg = os.urandom(message_bytes)
    start = time.perf_counter()
    sent = 0
    while sent < total_bytes:
        await pipe.send(msg)
        sent += len(msg)
    assert await pipe.recv() == b"done"
    end = await done
    m = pipe.machine
    retx = m.retransmitted_packets
    await pipe.close()
    await listener.close()
    secs = end - start
    return {"mib_s": total_bytes / secs / 2**20, "seconds": secs, "retransmits": retx}


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    total = args.mib * 2**20
    for size in [int(s) for s in args.sizes.split(",")]:
        for loss_pct in [float(x) for x in args.loss.split(",")]:
            runs = [await one_run(total, size, loss_pct / 100, args.message_kib * 1024)
                    for _ in range(args.runs)]
            rows.append({
                "datagram_bytes": size, "loss_pct": loss_pct, "mib": args.mib,
                "mib_s": round(statistics.median(r["mib_s"] for r in runs), 1),
                "seconds": round(statistics.median(r["seconds"] for r in runs), 2),
                "retransmits": int(statistics.median(r["retransmits"] for r in runs)),
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--sizes", default="1452,60000")
    ap.add_argument("--loss", default="0,1,5")
    ap.add_argument("--message-kib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop
        rows = uvloop.run(main_async(args))
    else:
        rows = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'datagram B':>10} {'loss %':>6} {'MiB':>5} {'MiB/s':>8} {'s':>7} {'retx':>7}")
    for r in rows:
        print(f"{r['datagram_bytes']:>10} {r['loss_pct']:>6g} {r['mib']:>5} {r['mib_s']:>8} "
              f"{r['seconds']:>7} {r['retransmits']:>7}")


if __name__ == "__main__":
    main()
