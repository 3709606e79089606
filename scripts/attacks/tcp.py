"""TCP before authentication: connection floods against a real node process.

Starts a bootstrap server and two real nodes on 127.0.0.1 ("victim" and its
trusted "friend"), then, one flood at a time, holds many unauthenticated TCP
connections open to the victim's TCP port while the friend runs a trusted
`node ping --transport tcp` to it:

* announce: each connection announces an 8 MiB frame and sends 64 KiB of it
  (before the fix each such connection made the node allocate the whole frame);
* slowloris: each connection sends a partial handshake-sized frame and then
  nothing, holding a half-open slot; spread over many source addresses so that
  the total cap, not the per-address one, is what holds.

The attacker's connections come from 127.0.0.2 and up (loopback only), so the
per-address cap can be told apart from the friend on 127.0.0.1. Measured: the
victim's RSS (sampled from /proc every 20 ms during the flood, and its VmHWM)
against its RSS before, and whether the trusted ping succeeded during the flood,
with its handshake time and median round trip.

    .venv/bin/python scripts/attacks/tcp.py [--quick]
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parents[1]
if str(_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(_SCRIPTS))

from testnet_lib import CommandFailed, Testnet  # noqa: E402

from attacks import Row  # noqa: E402

HOST = "127.0.0.1"
RSS_TARGET_MB = 32.0
FLOOD_CONNECTIONS = 1000
QUICK_CONNECTIONS = 300
ANNOUNCED_FRAME_BYTES = 8 * 1024 * 1024
ANNOUNCE_SENT_BYTES = 64 * 1024
PARTIAL_FRAME_BYTES = 4096  # announced; only PARTIAL_SENT_BYTES of it ever arrive
PARTIAL_SENT_BYTES = 100
PING_COUNT = 5
RSS_SAMPLE_INTERVAL_S = 0.02
SETTLE_S = 1.0  # after the flood is open, before the ping: let the node process it all
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class PingResult:
    ok: bool
    handshake_ms: float
    rtt_p50_ms: float
    wall_s: float
    error: str = ""


@contextmanager
def victim_and_friend(env: dict[str, str] | None = None) -> Iterator[Testnet]:
    """A bootstrap server and two real nodes that trust each other; torn down after.

    `env` reaches the node processes (e.g. PYTHONPATH=<older checkout> to measure it)."""
    with tempfile.TemporaryDirectory(prefix="p2pfs-attack-") as tmp:
        with Testnet(Path(tmp), env=env) as net:
            net.start_bootstrap(ttl_s=60)
            net.add_nodes(["victim", "friend"])
            net.wait_all_see_each_other(timeout=60)
            net.trust_all(["victim", "friend"])
            yield net


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


class RssSampler:
    """Samples a process's RSS in a thread; `peak_kib` is the largest value seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = rss_kib(pid)[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid)[0])
            except OSError:
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def trusted_ping(net: Testnet, transport: str, *, count: int = PING_COUNT) -> PingResult:
    """`node ping victim` from the friend; never raises for a failed ping."""
    t0 = time.monotonic()
    try:
        res = net.cli("friend", "ping", "victim", "--transport", transport, "--count",
                      str(count), check=False)
    except CommandFailed as exc:
        return PingResult(False, 0.0, 0.0, time.monotonic() - t0, str(exc)[:200])
    wall = time.monotonic() - t0
    if isinstance(res, subprocess.CompletedProcess):
        return PingResult(False, 0.0, 0.0, wall, (res.stderr or res.stdout).strip()[:200])
    rtts = [float(r) for r in res["rtt_ms"]]
    return PingResult(True, float(res["handshake_ms"]), statistics.median(rtts), wall)


def loopback_sources(n: int) -> list[str]:
    """n loopback addresses other than 127.0.0.1: 127.0.0.2, 127.0.0.3, ..."""
    return [f"127.0.{(i + 2) // 256}.{(i + 2) % 256}" for i in range(n)]


def open_flood(port: int, n: int, sources: list[str],
               payload: bytes) -> tuple[list[socket.socket], int]:
    """n connections to HOST:port, round-robin over `sources`, each sending `payload`.

    Returns the open sockets and how many connects failed."""
    socks: list[socket.socket] = []
    failed = 0
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((sources[i % len(sources)], 0))
            s.settimeout(CONNECT_TIMEOUT_S)
            s.connect((HOST, port))
            s.setblocking(False)
        except OSError:
            s.close()
            failed += 1
            continue
        try:
            s.send(payload)
        except OSError:
            pass  # refused already (reset) or buffers full: either way it stays counted
        socks.append(s)
    return socks, failed


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _flood_rows(net: Testnet, label: str, n: int, sources: list[str],
                payload: bytes) -> list[Row]:
    victim = net.node("victim")
    assert victim.pid is not None
    port = victim.ports["tcp"]
    rss0, hwm0 = rss_kib(victim.pid)
    with RssSampler(victim.pid) as sampler:
        t0 = time.monotonic()
        socks, failed = open_flood(port, n, sources, payload)
        open_s = time.monotonic() - t0
        try:
            time.sleep(SETTLE_S)
            ping = trusted_ping(net, "tcp")
            rss1, hwm1 = rss_kib(victim.pid)
        finally:
            _close_all(socks)
    peak = max(sampler.peak_kib, rss1, hwm1 if hwm1 > hwm0 else 0)
    grew_mb = max(0, peak - rss0) / 1024
    attack = f"tcp {label}: {n} conns"
    rows = [
        Row(attack, "victim RSS before", rss0 / 1024, "MB"),
        Row(attack, "victim RSS increase (peak)", grew_mb, "MB", f"< {RSS_TARGET_MB:g} MB",
            grew_mb < RSS_TARGET_MB),
        Row(attack, "flood connections opened", n - failed, "conns"),
        Row(attack, "flood open time", open_s, "s"),
        Row(attack, "trusted ping during flood", 1.0 if ping.ok else 0.0, "ok",
            "succeeds", ping.ok),
    ]
    return rows + ping_detail_rows(attack, ping)


def ping_detail_rows(attack: str, ping: PingResult) -> list[Row]:
    """The trusted ping's handshake and rtt during a flood, or why it failed (stderr)."""
    if not ping.ok:
        print(f"{attack}: trusted ping failed: {ping.error}", file=sys.stderr)
        return []
    return [Row(attack, "trusted handshake during flood", ping.handshake_ms, "ms"),
            Row(attack, "trusted ping rtt p50 during flood", ping.rtt_p50_ms, "ms")]


def measure(net: Testnet, quick: bool = False) -> list[Row]:
    """Every TCP flood against `net`'s victim (a testnet from `victim_and_friend()`)."""
    n = QUICK_CONNECTIONS if quick else FLOOD_CONNECTIONS
    rows: list[Row] = []
    base = trusted_ping(net, "tcp")
    rows.append(Row("tcp baseline", "trusted ping", 1.0 if base.ok else 0.0, "ok", "succeeds",
                    base.ok))
    if base.ok:
        rows.append(Row("tcp baseline", "trusted ping rtt p50", base.rtt_p50_ms, "ms"))
    announce = ANNOUNCED_FRAME_BYTES.to_bytes(4, "big") + bytes(ANNOUNCE_SENT_BYTES)
    rows += _flood_rows(net, "announce 8 MiB frames", n, loopback_sources(8), announce)
    partial = PARTIAL_FRAME_BYTES.to_bytes(4, "big") + bytes(PARTIAL_SENT_BYTES)
    rows += _flood_rows(net, "slowloris, 200 addrs", n, loopback_sources(200), partial)
    return rows


def run(quick: bool = False) -> list[Row]:
    with victim_and_friend() as net:
        return measure(net, quick=quick)


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
