"""UDP transport: a flood of spoofed INITs against a real node process.

Starts a bootstrap server and two real nodes on 127.0.0.1 ("victim" and its
trusted "friend"; see ``attacks/tcp.py``), then sends 10,000 well-formed INITs
to the victim's UDP port from 200 sources that never answer: sockets bound to
127.0.0.2..127.0.0.21, ten ports each, standing in for spoofed addresses
(loopback only). The flood is paced over a few seconds, and the friend's trusted
`node ping --transport udp` starts with it, so the ping's handshake runs while
the flood is under way (the report says whether the ping ended before the flood).

Before the cookie, 300 such INITs filled the one shared half-open table and every
new udp channel failed for ~10 s. Measured: whether the ping succeeds during the
flood, its handshake time and median round trip, the victim's RSS before and at
its peak, and the bytes the victim sent back per byte of INIT (amplification).

Then two floods from attackers that own their addresses and so complete the cookie
exchange (the node's own udp client, bound to 127.0.0.2 and up): connections that
each send an 8 MiB message before authenticating, and connections that send
nothing and only hold a pre-auth slot, spread over 200 addresses. Measured as for
TCP: RSS before and at peak, the trusted ping during each flood.

    .venv/bin/python scripts/attacks/udp.py [--quick]
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parents[1]
if str(_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(_SCRIPTS))

from testnet_lib import Testnet  # noqa: E402

from attacks import Row  # noqa: E402
from attacks.tcp import (  # noqa: E402
    RSS_TARGET_MB,
    SETTLE_S,
    PingResult,
    RssSampler,
    loopback_sources,
    ping_detail_rows,
    rss_kib,
    trusted_ping,
    victim_and_friend,
)

HOST = "127.0.0.1"
FLOOD_INITS = 10_000
QUICK_INITS = 3_000
FLOOD_DURATION_S = 4.0
QUICK_DURATION_S = 2.0
SOURCE_ADDRS = 20
SOCKETS_PER_ADDR = 10
# the INIT of udp wire version 2 (node/transports/udp_machine.py), built here from its
# documented layout so the attacker shares no code with the node:
# magic 0xD2, type 1, dcid 0 (8 B), scid (8 B), datagram size (u16), zero padding to 64 B
INIT_MAGIC = 0xD2
INIT_TYPE = 1
INIT_BYTES = 64
DATAGRAM_SIZE = 1452
COOKIE_CONNECTIONS = 1000
QUICK_COOKIE_CONNECTIONS = 300
ANNOUNCED_MESSAGE_BYTES = 8 * 1024 * 1024
CONNECT_BATCH = 50


def spoofed_init(i: int) -> bytes:
    head = struct.pack(">BB8s8sH", INIT_MAGIC, INIT_TYPE, bytes(8),
                       i.to_bytes(8, "big"), DATAGRAM_SIZE)
    return head + bytes(INIT_BYTES - len(head))


class InitFlood:
    """Sends `count` INITs to port over `duration_s` from many unanswering sources."""

    def __init__(self, port: int, count: int, duration_s: float) -> None:
        self.port = port
        self.count = count
        self.duration_s = duration_s
        self.sent = 0
        self.sent_bytes = 0
        self.started = self.ended = 0.0
        self.socks: list[socket.socket] = []
        for addr in loopback_sources(SOURCE_ADDRS):
            for _ in range(SOCKETS_PER_ADDR):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((addr, 0))
                s.setblocking(False)
                self.socks.append(s)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.started = time.monotonic()
        target = (HOST, self.port)
        for i in range(self.count):
            due = self.started + self.duration_s * i / self.count
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            dgram = spoofed_init(i)
            try:
                self.socks[i % len(self.socks)].sendto(dgram, target)
            except OSError:  # buffer full: a dropped INIT, as on a real network
                continue
            self.sent += 1
            self.sent_bytes += len(dgram)
        self.ended = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def replies(self) -> tuple[int, int]:
        """(datagrams, bytes) the victim sent back to the spoofed sources."""
        n = total = 0
        for s in self.socks:
            while True:
                try:
                    total += len(s.recv(2048))
                    n += 1
                except OSError:
                    break
        return n, total

    def close(self) -> None:
        for s in self.socks:
            s.close()


def measure(net: Testnet, quick: bool = False) -> list[Row]:
    """The spoofed-INIT flood against `net`'s victim (a testnet from `victim_and_friend()`)."""
    count = QUICK_INITS if quick else FLOOD_INITS
    duration = QUICK_DURATION_S if quick else FLOOD_DURATION_S
    victim = net.node("victim")
    assert victim.pid is not None
    rows: list[Row] = []
    base = trusted_ping(net, "udp")
    rows.append(Row("udp baseline", "trusted ping", 1.0 if base.ok else 0.0, "ok", "succeeds",
                    base.ok))
    if base.ok:
        rows.append(Row("udp baseline", "trusted ping rtt p50", base.rtt_p50_ms, "ms"))
    rss0, _ = rss_kib(victim.pid)
    flood = InitFlood(victim.ports["udp"], count, duration)
    try:
        with RssSampler(victim.pid) as sampler:
            flood.start()
            ping_started = time.monotonic()
            ping: PingResult = trusted_ping(net, "udp")
            ping_ended = time.monotonic()
            flood.join()
            rss1, _ = rss_kib(victim.pid)
        replies, reply_bytes = flood.replies()
    finally:
        flood.close()
    attack = f"udp spoofed INIT flood: {count}"
    grew_mb = max(0, max(sampler.peak_kib, rss1) - rss0) / 1024
    rate = flood.sent / max(flood.ended - flood.started, 1e-9)
    rows += [
        Row(attack, "INITs sent", flood.sent, "pkts"),
        Row(attack, "flood rate", rate, "pkt/s"),
        Row(attack, "trusted ping during flood", 1.0 if ping.ok else 0.0, "ok", "succeeds",
            ping.ok),
        Row(attack, "ping ended before the flood", 1.0 if ping_ended < flood.ended else 0.0,
            "yes"),
        Row(attack, "ping wall time (CLI start to exit)", ping_ended - ping_started, "s"),
        Row(attack, "victim RSS before", rss0 / 1024, "MB"),
        Row(attack, "victim RSS increase (peak)", grew_mb, "MB", f"< {RSS_TARGET_MB:g} MB",
            grew_mb < RSS_TARGET_MB),
        Row(attack, "replies to spoofed sources", replies, "pkts"),
        Row(attack, "reply bytes per INIT byte", reply_bytes / max(flood.sent_bytes, 1), "x",
            "<= 1", reply_bytes <= flood.sent_bytes),
    ]
    return rows + ping_detail_rows(attack, ping)


async def _open_cookie_flood(port: int, n: int, sources: list[str],
                             message: bytes | None) -> tuple[list, int]:
    """n udp connections that complete the cookie exchange from `sources`, each sending
    `message` (or nothing). Returns the open pipes and how many failed to connect."""
    from node.errors import P2PError  # the attacker uses the node's client: real cookies
    from node.transports import udp as udp_transport

    pipes: list = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        try:
            pipe = await udp_transport.connect(HOST, port, timeout=5.0,
                                               local_addr=(sources[i % len(sources)], 0))
        except P2PError:
            failed += 1
            return
        pipes.append(pipe)
        if message is not None:
            try:
                await pipe.send(message)
            except P2PError:
                pass  # reset by the victim already

    for start in range(0, n, CONNECT_BATCH):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + CONNECT_BATCH))))
    return pipes, failed


def _cookie_flood_rows(net: Testnet, label: str, n: int, sources: list[str],
                       message: bytes | None) -> list[Row]:
    victim = net.node("victim")
    assert victim.pid is not None
    rss0, _ = rss_kib(victim.pid)

    async def flood_and_ping() -> tuple[PingResult, int, int, float]:
        t0 = time.monotonic()
        pipes, failed = await _open_cookie_flood(victim.ports["udp"], n, sources, message)
        open_s = time.monotonic() - t0
        try:
            await asyncio.sleep(SETTLE_S)
            ping = await asyncio.to_thread(trusted_ping, net, "udp")
            return ping, n - failed, sum(1 for p in pipes if p.closed), open_s
        finally:
            for p in pipes:
                p.abort("attack over")

    with RssSampler(victim.pid) as sampler:
        ping, opened, reset, open_s = asyncio.run(flood_and_ping())
        rss1, _ = rss_kib(victim.pid)
    grew_mb = max(0, max(sampler.peak_kib, rss1) - rss0) / 1024
    attack = f"udp {label}: {n} conns"
    rows = [
        Row(attack, "victim RSS before", rss0 / 1024, "MB"),
        Row(attack, "victim RSS increase (peak)", grew_mb, "MB", f"< {RSS_TARGET_MB:g} MB",
            grew_mb < RSS_TARGET_MB),
        Row(attack, "flood connections opened", opened, "conns"),
        Row(attack, "of those closed by the victim", reset, "conns"),
        Row(attack, "flood open time", open_s, "s"),
        Row(attack, "trusted ping during flood", 1.0 if ping.ok else 0.0, "ok", "succeeds",
            ping.ok),
    ]
    return rows + ping_detail_rows(attack, ping)


def measure_cookie_floods(net: Testnet, quick: bool = False) -> list[Row]:
    """Floods from attackers that own their addresses (past the cookie)."""
    n = QUICK_COOKIE_CONNECTIONS if quick else COOKIE_CONNECTIONS
    return (_cookie_flood_rows(net, "announce 8 MiB messages", n, loopback_sources(8),
                               bytes(ANNOUNCED_MESSAGE_BYTES))
            + _cookie_flood_rows(net, "silent, 200 addrs", n, loopback_sources(200), None))


def run(quick: bool = False) -> list[Row]:
    with victim_and_friend() as net:
        return measure(net, quick=quick) + measure_cookie_floods(net, quick=quick)


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
