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

With --paths (root): time from `node ping` to its first reply per path, and hole
punch success per NAT type:

    .venv/bin/python scripts/bench_reach.py --paths [--trials 20] [--pings 5]

* LAN: two hosts on one bridge (tests/netns/lan_lab.py), found by LAN discovery;
* hole-punched: the NAT lab with port-preserving MASQUERADE routers that drop
  everything unsolicited (port-restricted cone), once a punch succeeded;
* relayed: the NAT lab with `MASQUERADE --random-fully` (symmetric-like).
"First reply" is the daemon's own figure (dial + handshake + first round trip,
from the ping's JSON); the `node ping` process's wall time is printed next to it.
Then --trials punches per NAT type through the control API's `punch` (the
coordination runs over the relay), each after both routers' masqueraded
conntrack entries were flushed (wan down/up), so every trial starts from cold
NATs; a trial counts as a success if any of its (up to 3) attempts got through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.channel import SecureChannel  # noqa: E402
from node.contact import ContactRecord  # noqa: E402
from node.errors import ChannelClosed, P2PError  # noqa: E402
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
        shutil.rmtree(tmp, ignore_errors=True)


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
        shutil.rmtree(root, ignore_errors=True)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _ping_times(cli: Callable[[], dict[str, Any]], pings: int, want: str) -> str:
    first: list[float] = []
    wall: list[float] = []
    for _ in range(pings):
        t0 = time.perf_counter()
        reply = cli()
        wall.append((time.perf_counter() - t0) * 1000)
        if reply["path"] != want:
            raise SystemExit(f"error: ping went {reply['path']}, expected {want}")
        first.append(reply["handshake_ms"] + reply["rtt_ms"][0])
    return (f"first reply median {_median(first):7.1f} ms (min {min(first):.1f}, max "
            f"{max(first):.1f}); `node ping` wall median {_median(wall):.0f} ms")


def _lan_ping(args: argparse.Namespace) -> str:
    import json

    from node.discovery.addresses import ANY_V4  # inside the lab's namespace: broadcasts
    from tests.netns.lan_lab import LanLab, skip_reason
    from tests.netns.nat_lab import wait_until as lab_wait

    reason = skip_reason()
    if reason:
        return f"skipped: {reason}"
    root = Path(tempfile.mkdtemp(prefix="bench-reach-lan-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PFS_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    procs: list[subprocess.Popen[bytes]] = []
    with LanLab(2) as lab:
        try:
            idents = [Identity.generate(f"h{i}") for i in range(2)]
            for i, ident in enumerate(idents):
                home = root / f"h{i}"
                home.mkdir(mode=0o700)
                ident.save(home)
                store = TrustStore.in_home(home)
                store.trust(idents[1 - i].peer_id, f"h{1 - i}")
                store.close()
                procs.append(subprocess.Popen(
                    lab.exec_argv(i, [sys.executable, "-m", "node", "start", "--home",
                                      str(home), "--listen-host", ANY_V4]),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                    start_new_session=True))

            def cli(*argv: str, ns: int | None = 0) -> subprocess.CompletedProcess[str]:
                cmd = [sys.executable, "-m", "node", *argv, "--home", str(root / "h0"),
                       "--json"]
                if ns is not None:
                    cmd = lab.exec_argv(ns, cmd)
                return subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      timeout=60)

            def knows() -> bool:
                res = cli("peers", ns=None)
                return res.returncode == 0 and any(
                    r["peer_id"] == str(idents[1].peer_id) for r in json.loads(res.stdout))

            lab_wait(knows, 30, "h0 heard h1 on the LAN")

            def ping() -> dict[str, Any]:
                res = cli("ping", str(idents[1].peer_id), "--count", "1")
                if res.returncode != 0:
                    raise SystemExit(f"error: LAN ping failed: {res.stderr}")
                return dict(json.loads(res.stdout))

            return _ping_times(ping, args.pings, "direct")
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            shutil.rmtree(root, ignore_errors=True)


def _flush_nats(lab: Any) -> None:
    """Delete every udp conntrack entry on both routers (`conntrack -D -p udp`; the
    relay's tcp connections stay): the next punch starts from NATs that never saw the
    peer's udp."""
    for i in (1, 2):
        subprocess.run(["ip", "netns", "exec", lab.ns(f"r{i}"), "conntrack", "-D", "-p",
                        "udp"], capture_output=True, timeout=10)


def _nat_paths(args: argparse.Namespace, random_fully: bool) -> list[str]:
    from node.control import ControlClient
    from tests.netns.nat_lab import NatLab
    from tests.netns.nat_lab import wait_until as lab_wait
    from tests.netns.nat_world import start_world

    kind = "random-fully" if random_fully else "port-restricted"
    root = Path(tempfile.mkdtemp(prefix=f"bench-reach-{kind}-"))
    lab = NatLab(root, random_fully=random_fully)
    out: list[str] = []
    try:
        lab.build()
        world = start_world(lab)
        want = "relayed" if random_fully else "hole-punched"

        def ping() -> dict[str, Any]:
            reply = world.cli("a", "ping", world.ids["b"], "--count", "1")
            assert isinstance(reply, dict)
            return reply

        if not random_fully:
            lab_wait(lambda: ping()["path"] == "hole-punched", 30, "a punched path")
        else:
            cold = ping()
            out.append(f"{want:<13} cold first ping (direct attempts time out first): "
                       f"{cold['handshake_ms'] + cold['rtt_ms'][0]:.0f} ms")
        out.append(f"{want:<13} ping: {_ping_times(ping, args.pings, want)}")

        def reserved() -> bool:
            for name in ("a", "b"):
                rel = world.cli(name, "status")["relays"]  # type: ignore[index]
                if not rel or rel[0]["state"] != "reserved":
                    return False
            return True

        async def punch() -> dict[str, Any]:
            reply = await ControlClient(world.homes["a"]).call(
                "punch", {"peer": world.ids["b"]}, timeout_s=60)
            return dict(reply)

        oks: list[dict[str, Any]] = []
        failures = 0
        for i in range(args.trials):
            _flush_nats(lab)
            lab_wait(reserved, 60, "both nodes hold reservations")
            try:
                result = asyncio.run(punch())
            except P2PError as exc:
                print(f"  {kind} trial {i + 1}: error {exc}", flush=True)
                failures += 1
                continue
            print(f"  {kind} trial {i + 1}: {'ok' if result['ok'] else 'failed'} after "
                  f"{result['attempts']} attempt(s), {result['elapsed_ms']:.0f} ms", flush=True)
            if result["ok"]:
                oks.append(result)
            else:
                failures += 1
        first = sum(1 for r in oks if r["attempts"] == 1)
        line = (f"{kind:<15} punch: {len(oks)}/{args.trials} succeeded ({first} on the first "
                "attempt)")
        if oks:
            line += (f", median {_median([r['elapsed_ms'] for r in oks]):.0f} ms from the "
                     "punch request to a verified direct channel (relayed circuit, its "
                     "handshake and the exchange included; relayed rtt median "
                     f"{_median([r['relayed_rtt_ms'] for r in oks]):.1f} ms)")
        out.append(line)
        return out
    finally:
        lab.teardown()
        shutil.rmtree(root, ignore_errors=True)


def run_paths(args: argparse.Namespace) -> int:
    from tests.netns.nat_lab import lab_unavailable_reason

    reason = lab_unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if shutil.which("conntrack") is None:
        print("error: --paths needs `conntrack` to reset the NATs between punch trials "
              "(Debian: apt-get install conntrack)", file=sys.stderr)
        return 2
    lines = [f"LAN           ping: {_lan_ping(args)}"]
    print(lines[0], flush=True)
    for random_fully in (False, True):
        for line in _nat_paths(args, random_fully):
            lines.append(line)
            print(line, flush=True)
    print("summary:")
    for line in lines:
        print("  " + line)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} cores")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--message-kib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--netns", action="store_true",
                        help="measure in the NAT lab (root; real node processes)")
    parser.add_argument("--paths", action="store_true",
                        help="time to first ping per path and punch success per NAT type "
                             "(root; NAT and LAN labs)")
    parser.add_argument("--trials", type=int, default=20, help="punches per NAT type")
    parser.add_argument("--pings", type=int, default=5, help="pings per path")
    args = parser.parse_args()
    try:
        if args.paths:
            return run_paths(args)
        if args.netns:
            return run_netns(args)
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
