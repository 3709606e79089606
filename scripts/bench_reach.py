"""Relayed vs direct channel throughput on 127.0.0.1, and the relay's CPU per MiB.

    .venv/bin/python scripts/bench_reach.py [--mib 256] [--message-kib 1024] [--runs 3]
    .venv/bin/python scripts/bench_reach.py --netns [--mib 64]     # root: the NAT lab

Two peers in this process (one event loop) open a tcp SecureChannel, once
directly and once through a relay running as its own process (``python -m
bootstrap.relay``), and stream --mib MiB of --message-kib messages one way;
the receiver acknowledges the last one. The relay's CPU time comes from
/proc/<pid>/stat (utime + stime) before and after the relayed runs. Prints one
line per run and a summary; quote the load average (printed) with any figure.

With --netns (root): the NAT lab of tests/netns/nat_lab.py (routers with
MASQUERADE --random-fully), real node processes, and `node share` of a --mib
file from host 1 to a node in the "internet" namespace (direct, out through
the NAT) and to host 2 behind the other NAT (relayed); wall time of each
`node share` (process start included) and the relay process's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.channel import SecureChannel  # noqa: E402
from node.contact import ContactRecord  # noqa: E402
from node.errors import ChannelClosed  # noqa: E402
from node.identity import Identity, PeerId  # noqa: E402
from node.peering import Peering  # noqa: E402
from node.reach.relay_client import RelayReservation  # noqa: E402
from node.trust import TrustStore  # noqa: E402

MIB = 1024 * 1024


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reach-"))
    relay_proc = subprocess.Popen(
        [sys.executable, "-m", "bootstrap.relay", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert relay_proc.stdout is not None
        line = relay_proc.stdout.readline()
        relay_addr = line.rsplit(" ", 1)[1].strip()
        records: dict[PeerId, ContactRecord] = {}

        async def locate(peer: PeerId) -> ContactRecord | None:
            return records.get(peer)

        ids = {n: Identity.generate(n) for n in ("sender", "receiver")}
        stores = {n: TrustStore(tmp / f"{n}.db") for n in ids}
        stores["sender"].trust(ids["receiver"].peer_id, "receiver")
        stores["receiver"].trust(ids["sender"].peer_id, "sender")
        peerings = {n: Peering(ids[n], stores[n], host="127.0.0.1", ports={"tcp": 0},
                               transports=["tcp"], locate=locate) for n in ids}
        total = args.mib * MIB
        msg_bytes = args.message_kib * 1024

        async def sink(channel: SecureChannel) -> None:
            got = 0
            try:
                while got < total:
                    got += len(await channel.recv())
                await channel.send(b"done")
                await channel.recv()
            except ChannelClosed:
                pass

        peerings["receiver"].register("sink", sink)
        ports = await peerings["receiver"].start()
        reservation = RelayReservation(ids["receiver"], relay_addr,
                                       peerings["receiver"].accept_pipe)
        res_task = asyncio.create_task(reservation.run())
        await asyncio.wait_for(reservation.reserved.wait(), 10)
        rid = ids["receiver"].peer_id
        direct = ContactRecord.create(ids["receiver"], ["127.0.0.1"], ports, 1)
        relayed = ContactRecord.create(ids["receiver"], ["127.0.0.1"], {"udp": 9}, 2,
                                       relays=[relay_addr])
        payload = os.urandom(msg_bytes)
        results: dict[str, list[float]] = {"direct": [], "relayed": []}
        relay_cpu = 0.0
        for i in range(args.runs):
            for path, record in (("direct", direct), ("relayed", relayed)):
                before = cpu_s(relay_proc.pid)
                channel = await peerings["sender"].connect(rid, "sink", record=record,
                                                           transport="tcp")
                assert channel.path == path, channel.path
                t0 = time.perf_counter()
                sent = 0
                while sent < total:
                    await channel.send(payload)
                    sent += msg_bytes
                assert await channel.recv() == b"done"
                elapsed = time.perf_counter() - t0
                await channel.close()
                if path == "relayed":
                    relay_cpu += cpu_s(relay_proc.pid) - before
                rate = total / MIB / elapsed
                results[path].append(rate)
                print(f"run {i + 1} {path:<8} {args.mib} MiB in {elapsed:.2f} s = "
                      f"{rate:.0f} MiB/s", flush=True)
        res_task.cancel()
        await asyncio.gather(res_task, return_exceptions=True)
        for p in peerings.values():
            await p.stop()
        for s in stores.values():
            s.close()
        best = {k: max(v) for k, v in results.items()}
        moved = args.runs * total / MIB
        print(f"best: direct {best['direct']:.0f} MiB/s, relayed {best['relayed']:.0f} MiB/s "
              f"({best['relayed'] / best['direct']:.0%} of direct)")
        print(f"relay CPU: {relay_cpu:.2f} s for {moved:.0f} MiB relayed = "
              f"{relay_cpu / moved * 1000:.2f} ms/MiB")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
              f"{os.cpu_count()} cores")
        return 0
    finally:
        relay_proc.terminate()
        relay_proc.wait(10)


def run_netns(args: argparse.Namespace) -> int:
    import json

    from tests.netns.nat_lab import HOST_ADDR, INTERNET_ADDR, NatLab, lab_unavailable_reason
    from tests.netns.nat_lab import wait_until as lab_wait

    reason = lab_unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-reach-lab-"))
    lab = NatLab(root, random_fully=True)
    try:
        lab.build()
        inet = lab.ns("inet")
        relay = lab.spawn(inet, [sys.executable, "-m", "bootstrap.relay", "--host",
                                 INTERNET_ADDR, "--port", "8474", "--log-level", "WARNING"],
                          "relay")
        lab.spawn(inet, [sys.executable, "-m", "bootstrap", "--host", INTERNET_ADDR,
                         "--port", "8470", "--db", str(root / "boot.sqlite3")], "bootstrap")
        names = {"a": ("h1", HOST_ADDR[1], True), "b": ("h2", HOST_ADDR[2], True),
                 "c": ("inet", INTERNET_ADDR, False)}
        idents = {n: Identity.generate(n) for n in names}
        for n in names:
            home = root / n
            home.mkdir(mode=0o700)
            idents[n].save(home)
            store = TrustStore.in_home(home)
            for other in names:
                if other != n:
                    store.trust(idents[other].peer_id, other)
            store.close()
        for n, (ns, host, natted) in names.items():
            argv = [sys.executable, "-m", "node", "start", "--home", str(root / n),
                    "--listen-host", host, "--port", "0",
                    "--bootstrap", f"http://{INTERNET_ADDR}:8470"]
            lab.spawn(lab.ns(ns) if ns != "inet" else inet,
                      argv + (["--relay", f"{INTERNET_ADDR}:8474"] if natted else []), n)

        def knows() -> bool:
            res = lab.node_cli(root / "a", "peers", "--json", timeout_s=10)
            ids = {r["peer_id"] for r in json.loads(res.stdout)} if res.returncode == 0 else set()
            return {str(idents["b"].peer_id), str(idents["c"].peer_id)} <= ids

        def reserved() -> bool:
            res = lab.node_cli(root / "b", "status", "--json", timeout_s=10)
            rel = json.loads(res.stdout).get("relays", []) if res.returncode == 0 else []
            return bool(rel) and rel[0]["state"] == "reserved"

        lab_wait(reserved, 30, "b holds a reservation")
        lab_wait(knows, 30, "a knows b and c")
        for i in range(args.runs):
            for to, path in (("c", "direct"), ("b", "relayed")):
                # fresh content every time: a file the peer already has is not sent again
                src = root / f"payload-{i}-{to}.bin"
                src.write_bytes(os.urandom(args.mib * MIB))
                cpu0 = cpu_s(relay.popen.pid)
                t0 = time.perf_counter()
                res = lab.node_cli(root / "a", "share", str(src), "--to", to, timeout_s=300)
                elapsed = time.perf_counter() - t0
                if res.returncode != 0:
                    print(f"error: share to {to} failed: {res.stderr.strip()}", file=sys.stderr)
                    return 1
                cpu = cpu_s(relay.popen.pid) - cpu0
                print(f"run {i + 1} {path:<8} {args.mib} MiB share in {elapsed:.2f} s = "
                      f"{args.mib / elapsed:.0f} MiB/s (relay CPU {cpu:.2f} s)", flush=True)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
              f"{os.cpu_count()} cores")
        return 0
    finally:
        lab.teardown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--message-kib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--netns", action="store_true",
                        help="measure in the NAT lab (root; real node processes)")
    args = parser.parse_args()
    try:
        if args.netns:
            return run_netns(args)
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
