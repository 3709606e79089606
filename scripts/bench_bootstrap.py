"""Benchmark of the bootstrap server: signed registrations/s and GET /peers latency.

The server runs as its own process (``python -m bootstrap``, uvloop) on
127.0.0.1; this process is the load generator. Records are signed ahead of
time, so the numbers measure the server, which still verifies every signature.

    .venv/bin/python scripts/bench_bootstrap.py            # table
    .venv/bin/python scripts/bench_bootstrap.py --json     # machine-readable
    .venv/bin/python scripts/bench_bootstrap.py --runs 5 --concurrency 64

Each figure is the median over ``--runs`` runs (a fresh server and database per
run). Targets on a 2-core machine: >= 2,000 signed registrations/s and
GET /peers?limit=200 p99 < 50 ms with 100k registered peers. These capacity runs
turn the per-address limits off (``UNLIMITED_ARGS``): all their traffic comes
from 127.0.0.1 and they measure the server, not the limiter.

Then flood runs with the default limits (``--flood-ids``, 0 skips them;
``--flood-runs N`` repeats them, ``--flood-only`` skips the capacity runs): 20
honest signed ids on 127.0.0.3-6 keep registering and listing through three
phases of one run, against a fresh server started with ``--bench-stats``:

* quiet: nothing else;
* flood: 127.0.0.2 sends 20,000 made-up ids (unsigned ones named to sort first,
  freshly signed ones, and 1,000-row listings) over 64 connections from its own
  process at nice 19 (a stand-in for a remote machine), as fast as the server
  answers or refuses, giving up on an answer after 50 ms;
* control: the same flooder, paced to the flood phase's request rate, floods a
  trivial HTTP server process on this machine that resets the same share of its
  connections at accept as ours did and answers the rest at once. The machine is
  as busy with the flooder; our server is not its target.

Each phase prints the honest p99 as the client sees it, the p99 of the time our
server held those requests (bootstrap.stats: middleware entry to answer written),
the server's loop stalls over 5 ms with the share of them it spent on a CPU (the
rest it was runnable and waiting for one), its GC passes, and the CPU of every
process and of the whole machine. Goals: every honest id stays in the first page
of GET /peers, the honest p99 under the flood within FLOOD_P99_FACTOR_MAX of the
quiet phase (the issue's goal) and of the control phase (our server's own part),
50 slowloris sockets (from 127.0.0.7) closed after the header timeout, and no
ERROR line in the server log. It also prints the server CPU per flood request
(beyond the honest traffic's share), the figure a busy shared machine moves least.

Where the honest time went under the flood (issue 9 item 8, measured with a
loop-lag probe and py-spy in the server): full GC passes of a heap the flood had
grown (30-70 ms each), 1,000-row listings encoded in one go (5-30 ms), tarpitted
handlers left sleeping for clients that had hung up, one address's 64
connections queued ahead of everyone, an HTTP parse + 429 for every request of
an address already over all its limits, and then a closed-loop flood's extra
connections: accepted because the address still had a token, each carried one
request that was parsed, queued for the address's turns and cancelled when the
flooder gave up on it. Fixed in bootstrap/server.py (Admission, _Listener). What
is left is mostly the machine: on this shared 2-core box the server's loop
stalls under the flood are 70-80 % time spent runnable but not running.
Imports the bootstrap package and node.identity/contact only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp

from bootstrap.store import RegistryStore
from node.contact import ContactRecord
from node.identity import Identity

SERVER_START_TIMEOUT_S = 20.0
TARGET_REGS_PER_S = 2000.0
TARGET_P99_MS = 50.0


# --pin-flooder: the CPUs the flooder runs on (empty: anywhere)
FLOODER_CPUS: set[int] = set()


class ServerProcess:
    """`python -m bootstrap` on a free port; stopped with SIGTERM."""

    def __init__(self, db: Path, ttl_s: float, extra_args: tuple[str, ...] = ()) -> None:
        self.log_path = db.with_suffix(".log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0",
             "--db", str(db), "--ttl", str(ttl_s), *extra_args],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL, stderr=self._log)
        self.url = self._wait_url()

    def _wait_url(self) -> str:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", self.log_path.read_text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"bootstrap server did not start:\n{self.log_path.read_text()}")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def make_bodies(n_peers: int) -> list[bytes]:
    bodies = []
    for i in range(n_peers):
        ident = Identity.generate(f"bench-{i}")
        rec = ContactRecord.create(ident, ["127.0.0.1"],
                                   {"tcp": 20000 + i % 20000, "udp": 40000 + i % 20000}, 1)
        bodies.append(json.dumps({"device_id": str(ident.peer_id),
                                  "record": rec.to_json()}).encode())
    return bodies


async def _raw_post_worker(host: str, port: int, requests: list[bytes],
                           latencies: list[float], counter: list[int]) -> None:
    """One keep-alive HTTP/1.1 connection posting prepared requests.

    A raw stream client, not aiohttp's: the load generator shares the machine
    with the server, so it should spend as little CPU per request as possible.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] < len(requests):
            req = requests[counter[0]]
            counter[0] += 1
            t = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m is None:
                raise RuntimeError("answer without Content-Length")
            body = await reader.readexactly(int(m.group(1)))
            if status != 200:
                raise RuntimeError(f"POST /register answered {status}: {body[:200]!r}")
            latencies.append(time.perf_counter() - t)
    finally:
        writer.close()
        await writer.wait_closed()


async def register_load(url: str, bodies: list[bytes], total: int,
                        concurrency: int) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (f"POST /register HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: ")
    prepared = [b"%s%d\r\n\r\n%s" % (head.encode(), len(b), b) for b in bodies]
    requests = [prepared[i % len(prepared)] for i in range(total)]
    latencies: list[float] = []
    counter = [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(_raw_post_worker(host, port, requests, latencies, counter)
                           for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"regs_per_s": total / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


async def peers_latency(url: str, ids: list[str], requests: int,
                        limit: int) -> dict[str, float]:
    import base64

    rng = random.Random(7)
    lat: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(requests + 20):
            params = {"limit": str(limit)}
            if i % 2:  # half first pages, half deep pages at a random keyset cursor
                # bulk_load placed ids[k] in slot k: the server's cursor is "slot:device_id"
                k = rng.randrange(len(ids))
                cur = f"{k}:{ids[k]}".encode()
                params["cursor"] = base64.urlsafe_b64encode(cur).decode().rstrip("=")
            t = time.perf_counter()
            async with session.get(url + "/peers", params=params) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GET /peers answered {resp.status}: {body[:200]!r}")
            if i >= 20:  # the first requests warm caches
                lat.append(time.perf_counter() - t)
    lat.sort()
    return {"p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
            "bytes": float(len(body))}


def bulk_load(db: Path, n: int, templates: list[str]) -> list[str]:
    store = RegistryStore(db)
    now = time.time()
    ids = [f"peer-{i:07d}" for i in range(n)]
    try:
        store.bulk_load((d, templates[i % len(templates)], now, now + 7200)
                        for i, d in enumerate(ids))
    finally:
        store.close()
    return ids


# -- one flooding address against honest ones -----------------------------------------

FLOOD_IP = "127.0.0.2"
# honest clients sit on their own loopback addresses, HONEST_PER_IP identities each
HONEST_IPS = ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
HONEST_PER_IP = 5
# each honest identity registers and lists this often: 2 requests/s per identity,
# 10/s per address, inside the default 50/s buckets
HONEST_PERIOD_S = 0.5
FLOOD_IDS = 20_000
FLOOD_CONCURRENCY = 64
# every FLOOD_LIST_EVERY-th flood request is a GET /peers?limit=1000 instead
FLOOD_LIST_EVERY = 10
# the flooder does not wait out the server's 1 s tarpit on a 429: after this long without
# an answer it drops the connection and goes on with a new one (the worst case for the
# server: a TCP accept plus a parsed request per flood request)
FLOOD_PATIENCE_S = 0.05
BASELINE_S = 5.0
SLOWLORIS_CONNECTIONS = 50
# slowloris comes from an address of its own: the flooding one may still be refused at
# accept after its flood, and the point is the header timeout
SLOWLORIS_IP = "127.0.0.7"
# the goal "a flood does not raise the honest p99", read as: within this factor of the
# same run's quiet phase (and, the server's own part, of its control phase)
FLOOD_P99_FACTOR_MAX = 1.5
# capacity runs measure the server, not the limits: all limits off, explicitly
UNLIMITED_ARGS = ("--register-rate", "0", "--list-rate", "0", "--legacy-per-ip", "0",
                  "--turns-per-ip", "0")


class _Http1:
    """One keep-alive HTTP/1.1 connection from a chosen loopback address (raw streams: cheap)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, local_ip: str) -> _Http1:
        reader, writer = await asyncio.open_connection(host, port, local_addr=(local_ip, 0))
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        body = await self.reader.readexactly(int(m.group(1))) if m else b""
        return int(head[9:12]), body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _post(host: str, port: int, body: bytes) -> bytes:
    return (b"POST /register HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body))


def _get(host: str, port: int, path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path.encode(), host.encode(), port)


async def _honest_client(host: str, port: int, ip: str, body: bytes, stop: asyncio.Event,
                         lat: list[float], statuses: dict[int, int]) -> None:
    conn = await _Http1.open(host, port, ip)
    rng = random.Random(body)
    try:
        await asyncio.sleep(rng.uniform(0, HONEST_PERIOD_S))
        while not stop.is_set():
            for raw in (_post(host, port, body), _get(host, port, "/peers")):
                t = time.perf_counter()
                status, _ = await conn.request(raw)
                lat.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HONEST_PERIOD_S * rng.uniform(0.9, 1.1))
    finally:
        await conn.close()


async def _flood_worker(host: str, port: int, requests: list[bytes], counter: list[int],
                        statuses: dict[int, int], pace: _Pace | None = None) -> None:
    """Send requests on one connection; when no answer comes within FLOOD_PATIENCE_S or
    the connection is reset (the server refused it at accept: that can happen before the
    connect even completes here), drop it and go on with a new one. Each request spent is
    one attempt, answered or not."""
    conn: _Http1 | None = None
    try:
        while counter[0] < len(requests):
            i = counter[0]
            raw = requests[i]
            counter[0] += 1
            if pace is not None:
                await pace.wait_turn(i)
            try:
                if conn is None:
                    # a connect the kernel drops (the server blocked this address) gets
                    # no answer at all: given up on as an unanswered request is
                    conn = await asyncio.wait_for(_Http1.open(host, port, FLOOD_IP),
                                                  FLOOD_PATIENCE_S)
                status, _ = await asyncio.wait_for(conn.request(raw), FLOOD_PATIENCE_S)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                status = 0  # no answer in time (tarpitted, dropped) or connection reset
            if conn is not None and (status == 0 or (
                    pace is not None and pace.reconnect_after(i))):
                await conn.close()
                conn = None
            if status == 0 or (pace is not None and pace.reconnect_after(i)):
                counter[1] += 1
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        if conn is not None:
            await conn.close()


class _Pace:
    """Open-loop schedule for the control flood: request i goes out at ``t0 + i / rate``,
    and the connection is replaced after it as often as the real flood replaced its own
    (``reconnect_frac`` of requests), so the flooder does the same work at the same rate."""

    def __init__(self, rate_per_s: float, reconnect_frac: float) -> None:
        self.rate_per_s = rate_per_s
        self.reconnect_frac = reconnect_frac
        self.t0 = time.perf_counter()

    async def wait_turn(self, i: int) -> None:
        delay = self.t0 + i / self.rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    def reconnect_after(self, i: int) -> bool:
        return int((i + 1) * self.reconnect_frac) > int(i * self.reconnect_frac)


# the honest clients' own event loop: a wake-up later than this is a stall (the process
# waited for a CPU: on a shared machine that is part of every honest latency measured)
CLIENT_STALL_S = 0.005


async def _loop_stalls(stop: asyncio.Event, stalls: list[float]) -> None:
    """Record how late each 1 ms sleep of this process's loop wakes, beyond CLIENT_STALL_S."""
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        late = time.perf_counter() - t - 0.001
        if late > CLIENT_STALL_S:
            stalls.append(late)


def _stall_summary(stalls: list[float]) -> dict[str, float]:
    return {"count": float(len(stalls)), "max_ms": max(stalls, default=0.0) * 1000}


def _p99_ms(lat: list[float]) -> float:
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")


async def _slowloris_open_after(host: str, port: int, n: int, wait_s: float) -> int:
    """Open n connections that send half a request header and trickle one byte a second;
    return how many the server still holds open after ``wait_s``."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port,
                                                       local_addr=(SLOWLORIS_IP, 0))
        writer.write(b"POST /register HTTP/1.1\\r\\nHost: x\\r\\nX-Slow: ")
        conns.append((reader, writer))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for reader, writer in conns:
            if not reader.at_eof() and not writer.is_closing():
                with contextlib.suppress(OSError):
                    writer.write(b"a")
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    still_open = 0
    for reader, writer in conns:
        try:
            data = await asyncio.wait_for(reader.read(1), 0.05)
            still_open += bool(data)
        except TimeoutError:
            still_open += 1  # nothing came and no EOF: the server holds it open
        except ConnectionError:
            pass
        writer.close()
    return still_open


def _flood_requests(host: str, port: int, flood_ids: int) -> list[bytes]:
    signed = make_bodies(max(1, flood_ids // 2))
    flood: list[bytes] = []
    for i in range(flood_ids):
        if i % FLOOD_LIST_EVERY == FLOOD_LIST_EVERY - 1:
            flood.append(_get(host, port, "/peers?limit=1000"))
        elif i % 2:
            flood.append(_post(host, port, signed[(i // 2) % len(signed)]))
        else:  # digits sort before every peer id: first in a device_id order
            flood.append(_post(host, port, b'{"device_id": "0-flood-%06d"}' % i))
    return flood


def flood_main(url: str, flood_ids: int, rate_per_s: float = 0.0,
               reconnect_frac: float = 0.0) -> int:
    """The flooder, in its own process (``--flood URL``), so that its event loop does not
    delay the honest clients' measurements; prints its answer counts as JSON. With
    ``rate_per_s`` it sends at that rate (the control phase) instead of as fast as the
    server answers."""
    # lowest CPU priority: the flooder stands in for a remote machine, so its own CPU use
    # should not be what slows the server and the honest clients on this shared box
    os.nice(19)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    flood = _flood_requests(host, port, flood_ids)
    print("flooding", flush=True)
    statuses: dict[int, int] = {}
    counter = [0, 0]  # next request, reconnects

    async def go() -> None:
        pace = _Pace(rate_per_s, reconnect_frac) if rate_per_s > 0 else None
        await asyncio.gather(*(_flood_worker(host, port, flood, counter, statuses, pace)
                               for _ in range(FLOOD_CONCURRENCY)))

    t0, cpu0 = time.perf_counter(), time.process_time()
    asyncio.run(go())
    print(json.dumps({"elapsed_s": time.perf_counter() - t0, "requests": len(flood),
                      "reconnects": counter[1], "cpu_s": time.process_time() - cpu0,
                      "statuses": {str(k): v for k, v in sorted(statuses.items())}}))
    return 0


_CONTROL_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 2\r\n\r\n{}")


class _ControlProtocol(asyncio.Protocol):
    """The control phase's trivial HTTP/1.1 server: every request answered 200 ``{}`` at
    once (headers up to the blank line, then Content-Length bytes of body skipped)."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = re.search(rb"(?i)content-length:\s*(\d+)", self.buf[:end])
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < total:
                return
            self.buf = self.buf[total:]
            assert self.transport is not None
            self.transport.write(_CONTROL_ANSWER)


def control_server_main(reset_frac: float = 0.0) -> int:
    """``--control-server``: the trivial server on a free 127.0.0.1 port; prints the port,
    serves until SIGTERM. It resets ``reset_frac`` of the connections at accept (with
    SO_LINGER 0, spread evenly), as the real server refused that share of the flood's, so
    the flooder does the same work against either; the others are answered."""
    import socket
    import struct

    async def go() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        listener.setblocking(False)
        accepted = [0]
        linger = struct.pack("ii", 1, 0)

        async def serve(conn: socket.socket) -> None:
            with contextlib.suppress(OSError):
                await loop.connect_accepted_socket(_ControlProtocol, sock=conn)

        def on_ready() -> None:
            for _ in range(128):
                try:
                    conn, _addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                k = accepted[0]
                accepted[0] += 1
                if int((k + 1) * reset_frac) > int(k * reset_frac):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    conn.close()
                    continue
                conn.setblocking(False)
                tasks.add(loop.create_task(serve(conn)))

        tasks: set[asyncio.Task[None]] = set()
        loop.add_reader(listener.fileno(), on_ready)
        print(listener.getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        loop.remove_reader(listener.fileno())
        listener.close()

    try:
        import uvloop

        uvloop.run(go())
    except ImportError:
        asyncio.run(go())
    return 0


def _proc_cpu_s(pid: int, which: str = "all") -> float:
    """CPU seconds of a process so far: user + system, or only ``"sys"`` (kernel)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = int(fields[12]) if which == "sys" else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class _Meter:
    """Machine and per-process CPU over one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.ticks0 = _machine_ticks()
        self.cpu0 = {name: _proc_cpu_s(pid) for name, pid in pids.items()}
        self.sys0 = {name: _proc_cpu_s(pid, "sys") for name, pid in pids.items()}
        self.own0 = time.process_time()

    def done(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        busy1, total1 = _machine_ticks()
        busy0, total0 = self.ticks0
        out = {"wall_s": wall,
               "machine_busy_pct": 100.0 * (busy1 - busy0) / max(1, total1 - total0),
               "honest_clients_cpu_pct": 100.0 * (time.process_time() - self.own0) / wall,
               "load_avg_1m": os.getloadavg()[0]}
        for name, pid in self.pids.items():
            out[f"{name}_cpu_pct"] = 100.0 * (_proc_cpu_s(pid) - self.cpu0[name]) / wall
            out[f"{name}_sys_cpu_pct"] = \
                100.0 * (_proc_cpu_s(pid, "sys") - self.sys0[name]) / wall
        return out


async def _server_stats(host: str, port: int) -> dict[str, Any]:
    """The server's bench timing (bootstrap.stats) since the last call, then reset."""
    conn = await _Http1.open(host, port, "127.0.0.1")
    try:
        status, body = await conn.request(_get(
            host, port, "/_bench/stats?reset=1&group=" + ",".join(HONEST_IPS)))
    finally:
        await conn.close()
    if status != 200:
        raise RuntimeError(f"GET /_bench/stats answered {status}")
    return cast(dict[str, Any], json.loads(body))


async def _start_flooder(target_url: str, flood_ids: int, rate_per_s: float = 0.0,
                         reconnect_frac: float = 0.0) -> asyncio.subprocess.Process:
    args = [sys.executable, str(Path(__file__).resolve()), "--flood", target_url,
            "--flood-ids", str(flood_ids)]
    if rate_per_s > 0:
        args += ["--flood-rate", f"{rate_per_s:.3f}", "--flood-reconnect",
                 f"{reconnect_frac:.5f}"]
    flooder = await asyncio.create_subprocess_exec(
        *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    if FLOODER_CPUS:
        os.sched_setaffinity(flooder.pid, FLOODER_CPUS)
    # the flooder signs its ids first; measure only while it sends
    line = await flooder.stdout.readline() if flooder.stdout else b""
    if line.strip() != b"flooding":
        flooder.kill()
        await flooder.wait()
        raise RuntimeError("the flood process did not start")
    return flooder


def run_flood(workdir: Path, flood_ids: int = FLOOD_IDS, baseline_s: float = BASELINE_S,
              header_timeout_s: float | None = None,
              server_args: tuple[str, ...] = (), flood_rate_per_s: float = 0.0
              ) -> dict[str, Any]:
    """Three phases in one run, the honest clients (20 signed ids on 127.0.0.3-6,
    registering and listing) on our server in each:

    * quiet: nothing else (``baseline_s``);
    * flood: 127.0.0.2 floods our server with ``flood_ids`` made-up ids (half unsigned
      legacy ids named to sort first, half freshly signed peer ids, every 10th request a
      1,000-row listing) as fast as it answers;
    * control: the same flooder, at the flood phase's request and reconnect rate, floods
      a trivial HTTP server process on this machine instead: the machine is as busy with
      the flooder, our server is not its target. Honest p99 under the flood close to the
      control's means our server adds nothing beyond the machine's contention.

    Then 50 slowloris connections. The server runs with its default limits
    (``header_timeout_s`` shortened for quick runs) and bench timing on
    (bootstrap.stats: how long it held each honest request, its own loop stalls)."""
    honest = make_bodies(len(HONEST_IPS) * HONEST_PER_IP)
    honest_ids = [json.loads(b)["device_id"] for b in honest]
    extra: tuple[str, ...] = ("--bench-stats", *server_args)
    if header_timeout_s is not None:
        extra += ("--header-timeout", str(header_timeout_s))
    srv = ServerProcess(workdir / "flood.sqlite3", 300, extra)
    controls: list[subprocess.Popen[bytes]] = []
    parts = urlsplit(srv.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        pids = {"server": srv.proc.pid}

        async def honest_phase(name: str, duration_s: float | None,
                               during: Awaitable[Any] | None = None) -> None:
            await _server_stats(host, port)  # reset
            meter = _Meter(pids)
            stop = asyncio.Event()
            lat: list[float] = []
            statuses: dict[int, int] = {}
            stalls: list[float] = []
            tasks = [asyncio.create_task(_honest_client(
                host, port, HONEST_IPS[i // HONEST_PER_IP], body, stop, lat, statuses))
                for i, body in enumerate(honest)]
            tasks.append(asyncio.create_task(_loop_stalls(stop, stalls)))
            try:
                if during is not None:
                    await during
                else:
                    await asyncio.sleep(duration_s or 0)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            phase: dict[str, Any] = dict(meter.done())
            stats = await _server_stats(host, port)
            phase.update({
                "honest_p99_ms": _p99_ms(lat),
                "honest_p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
                "honest_requests": len(lat),
                "honest_statuses": {str(k): v for k, v in sorted(statuses.items())},
                "honest_client_stalls": _stall_summary(stalls),
                "server_held_honest": stats["group"],
                "server_loop_stalls": stats["loop_stalls"],
                "server_gc": stats.get("gc"),
                "server_held_flooder": stats["sources"].get(FLOOD_IP, {"count": 0}),
                "server_flooder_statuses": stats["statuses"].get(FLOOD_IP, {}),
                "server_flooder_conns_accepted": stats["accepted"].get(FLOOD_IP, 0),
                "server_flooder_conns_refused": stats["refused_at_accept"].get(FLOOD_IP, 0),
                "server_flooder_kernel_blocks": stats.get("kernel_blocks", {}).get(FLOOD_IP, 0),
            })
            out[name] = phase

        async def flood_phase(name: str, target_url: str, rate_per_s: float = 0.0,
                              reconnect_frac: float = 0.0) -> dict[str, Any]:
            flooder = await _start_flooder(target_url, flood_ids, rate_per_s, reconnect_frac)
            reported: list[bytes] = []

            async def flood_done() -> None:
                reported.append((await flooder.communicate())[0])

            try:
                await honest_phase(name, None, flood_done())
            finally:
                if flooder.returncode is None:
                    flooder.kill()
                    await flooder.wait()
            report = json.loads(reported[0]) if reported and reported[0] else {}
            out[name]["flooder"] = report
            # the flooder has exited: its CPU comes from its own report
            out[name]["flooder_cpu_pct"] = 100.0 * float(report.get("cpu_s") or 0.0) / \
                max(1e-9, float(report.get("elapsed_s") or 0.0))
            return cast(dict[str, Any], report)

        await honest_phase("quiet", baseline_s)
        # closed loop (as fast as the server answers or refuses) unless a rate is given: a
        # server that refuses faster gets a faster closed-loop flooder, so comparing two
        # servers' CPU share fairly takes the same fixed rate against both
        report = await flood_phase("flood", srv.url, flood_rate_per_s)
        flood_s = float(report.get("elapsed_s") or 0.0)
        requests = int(report.get("requests") or 0)
        if flood_s > 0 and requests:
            f = out["flood"]
            conns = f["server_flooder_conns_accepted"] + f["server_flooder_conns_refused"]
            control = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--control-server",
                 "--control-reset", f"{f['server_flooder_conns_refused'] / max(1, conns):.5f}"],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
            controls.append(control)
            assert control.stdout is not None
            control_port = int(await asyncio.to_thread(control.stdout.readline))
            pids["control_server"] = control.pid
            # the flooder's own logic as in the flood (a reset or no answer: a new
            # connection), paced to the flood's rate
            await flood_phase("control", f"http://127.0.0.1:{control_port}",
                              requests / flood_s)
            out["control"]["flood_rate_per_s"] = requests / float(
                out["control"]["flooder"].get("elapsed_s") or math.inf)
        out["flood"]["flood_rate_per_s"] = requests / flood_s if flood_s > 0 else 0.0
        # legacy keys (bench_attacks, docs): the quiet and flood phases
        q, f = out["quiet"], out["flood"]
        out["honest_p99_no_flood_ms"] = q["honest_p99_ms"]
        out["honest_p99_flood_ms"] = f["honest_p99_ms"]
        out["honest_p99_control_ms"] = out.get("control", {}).get("honest_p99_ms", float("nan"))
        out["honest_requests_no_flood"] = q["honest_requests"]
        out["honest_requests_flood"] = f["honest_requests"]
        out["honest_client_stalls_no_flood"] = q["honest_client_stalls"]
        out["honest_client_stalls_flood"] = f["honest_client_stalls"]
        out["server_cpu_pct_no_flood"] = q["server_cpu_pct"]
        out["server_cpu_pct_flood"] = f["server_cpu_pct"]
        out["flood_s"] = report.get("elapsed_s")
        out["flood_requests"] = report.get("requests")
        out["flood_statuses"] = report.get("statuses")
        out["honest_statuses"] = f["honest_statuses"]
        # what one flood request costs the server beyond the honest traffic's share: the
        # figure that does not depend on how busy the shared machine was
        if flood_s > 0 and requests:
            extra_pct = f["server_cpu_pct"] - q["server_cpu_pct"]
            out["server_cpu_us_per_flood_request"] = \
                max(0.0, extra_pct / 100 * flood_s) / requests * 1e6
        conn = await _Http1.open(host, port, HONEST_IPS[0])
        try:
            status, body = await conn.request(_get(host, port, "/peers"))
            first = [p["device_id"] for p in json.loads(body)["peers"]] if status == 200 else []
            status, health = await conn.request(_get(host, port, "/health"))
            out["online_after_flood"] = json.loads(health)["online"]
            status, reply = await conn.request(_post(host, port, honest[0]))
            answered = json.loads(reply)["peers"] if status == 200 else []
        finally:
            await conn.close()
        out["first_page_len"] = len(first)
        out["honest_in_first_page"] = len(set(honest_ids) & set(first))
        out["honest_in_register_answer"] = len(set(honest_ids) & set(answered))
        out["register_answer_len"] = len(answered)
        out["honest_total"] = len(honest_ids)
        wait_s = (header_timeout_s or 10.0) + 1.0
        out["slowloris_wait_s"] = wait_s
        out["slowloris_open_after_timeout"] = await _slowloris_open_after(
            host, port, SLOWLORIS_CONNECTIONS, wait_s)
        return out

    try:
        result = asyncio.run(scenario())
    finally:
        srv.stop()
        for control in controls:
            control.terminate()
            try:
                control.wait(timeout=10)
            except subprocess.TimeoutExpired:
                control.kill()
                control.wait()
            if control.stdout is not None:
                control.stdout.close()
    log = srv.log_path.read_text()
    result["server_log_errors"] = sum(" ERROR " in line or "Traceback" in line
                                      for line in log.splitlines())
    result["load_avg_1m"] = os.getloadavg()[0]
    return result


def one_run(args: argparse.Namespace, bodies: list[bytes], templates: list[str],
            workdir: Path, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    db = workdir / f"reg-{run}.sqlite3"
    srv = ServerProcess(db, 3600, UNLIMITED_ARGS)
    try:
        cpu0 = srv.cpu_s()
        out["register"] = asyncio.run(
            register_load(srv.url, bodies, args.registrations, args.concurrency))
        cpu_us = (srv.cpu_s() - cpu0) / args.registrations * 1e6
        # what one dedicated core would sustain: the figure that does not depend on how
        # busy the shared machine was during the run
        out["register"]["server_cpu_us_per_reg"] = cpu_us
        out["register"]["regs_per_server_cpu_s"] = 1e6 / cpu_us if cpu_us > 0 else float("nan")
    finally:
        srv.stop()
    for n in args.sizes:
        db = workdir / f"peers-{run}-{n}.sqlite3"
        ids = bulk_load(db, n, templates)
        srv = ServerProcess(db, 3600, UNLIMITED_ARGS)
        try:
            out[f"peers_{n}"] = asyncio.run(peers_latency(srv.url, ids, args.requests, 200))
        finally:
            srv.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--registrations", type=int, default=6000, help="POST /register per run")
    ap.add_argument("--peers", type=int, default=2000, help="distinct signed identities")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent HTTP clients")
    ap.add_argument("--requests", type=int, default=500, help="GET /peers per size per run")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--flood-ids", type=int, default=FLOOD_IDS,
                    help="made-up ids the flooding address sends (0 = skip the flood run)")
    ap.add_argument("--flood-runs", type=int, default=1,
                    help="flood runs (quiet / flood / control each); medians are printed")
    ap.add_argument("--flood-only", action="store_true",
                    help="skip the capacity runs, only the flood run(s)")
    ap.add_argument("--flood-at", type=float, default=0.0, metavar="PER_S",
                    help="pace the flood phase at this many requests/s (default: as fast "
                         "as the server answers or refuses)")
    ap.add_argument("--quiet-s", type=float, default=BASELINE_S,
                    help=f"length of each flood run's quiet phase (default {BASELINE_S:g} s)")
    ap.add_argument("--pin-flooder", action="store_true",
                    help="run the flooder on the last CPU and everything else (servers, "
                         "honest clients) on the others, as for a remote attacker whose "
                         "CPU is not the server's; needs 2+ CPUs")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra `python -m bootstrap` argument for the flood runs' server "
                         "(repeatable, e.g. --server-arg=--register-burst --server-arg=100)")
    # the flooder and the control phase's trivial server, each its own process
    ap.add_argument("--flood", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--flood-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--flood-reconnect", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--control-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--control-reset", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood:
        return flood_main(args.flood, args.flood_ids, args.flood_rate, args.flood_reconnect)
    if args.control_server:
        return control_server_main(args.control_reset)
    if args.pin_flooder:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin-flooder needs at least 2 CPUs")
        FLOODER_CPUS.add(cpus[-1])
        os.sched_setaffinity(0, set(cpus[:-1]))  # the servers started later inherit it
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    bodies = make_bodies(args.peers)
    templates = [json.dumps(json.loads(b)["record"], separators=(",", ":"))
                 for b in bodies[:1000]]
    runs = []
    floods: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp:
        for run in range(0 if args.flood_only else args.runs):
            runs.append(one_run(args, bodies, templates, Path(tmp), run))
        if args.flood_ids > 0:
            for run in range(args.flood_runs):
                fresh = Path(tmp) / f"flood-{run}"  # a fresh registry per run
                fresh.mkdir()
                floods.append(run_flood(fresh, args.flood_ids, args.quiet_s,
                                        server_args=tuple(args.server_arg),
                                        flood_rate_per_s=args.flood_at))
    flood = floods[-1] if floods else None
    if args.flood_only:
        if args.json:
            print(json.dumps({"floods": floods, "medians": flood_medians(floods),
                              "flooder_cpus": sorted(FLOODER_CPUS)}, indent=2))
        else:
            if FLOODER_CPUS:
                print(f"flooder pinned to CPU {sorted(FLOODER_CPUS)}, everything else to "
                      f"{sorted(os.sched_getaffinity(0))}")
            print_floods(floods, args.flood_ids)
        return 0

    def med(key: str, field: str) -> float:
        return float(statistics.median(r[key][field] for r in runs))

    result: dict[str, Any] = {
        "runs": args.runs, "concurrency": args.concurrency, "cpus": os.cpu_count(),
        "register": {f: med("register", f) for f in (
            "regs_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_reg", "regs_per_server_cpu_s")},
        "load_avg_1m": os.getloadavg()[0],
        "peers": {str(n): {f: med(f"peers_{n}", f) for f in ("p50_ms", "p99_ms", "bytes")}
                  for n in args.sizes},
        "all_runs": runs,
        "flood": flood,
        "floods": floods,
        "flood_medians": flood_medians(floods) if floods else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    reg = result["register"]
    print(f"bootstrap benchmark: median of {args.runs} runs, server and load generator "
          f"in separate processes, {os.cpu_count()} CPUs, "
          f"load average {result['load_avg_1m']:.1f} (shared machine)")
    print(f"{'measurement':<44} {'median':>12} {'target':>12}")
    print(f"{'signed registrations/s (c=' + str(args.concurrency) + ')':<44} "
          f"{reg['regs_per_s']:>12,.0f} {'>= 2,000':>12}")
    print(f"{'  server CPU per registration (us)':<44} {reg['server_cpu_us_per_reg']:>12.0f}")
    print(f"{'  registrations per server CPU-second':<44} {reg['regs_per_server_cpu_s']:>12,.0f}")
    print(f"{'  POST /register latency p50 / p99 (ms)':<44} "
          f"{reg['p50_ms']:>5.1f} / {reg['p99_ms']:<5.1f} {'':>12}")
    for n in args.sizes:
        p = result["peers"][str(n)]
        print(f"{f'GET /peers?limit=200 @ {n:,} peers p50 (ms)':<44} {p['p50_ms']:>12.2f}")
        print(f"{f'GET /peers?limit=200 @ {n:,} peers p99 (ms)':<44} {p['p99_ms']:>12.2f} "
              f"{'< 50' if n >= 100_000 else '':>12}")
    if floods:
        print()
        print_floods(floods, args.flood_ids)
    return 0


# the per-run figures of a flood run that get a median over runs
_MEDIAN_KEYS = ("honest_p99_no_flood_ms", "honest_p99_control_ms", "honest_p99_flood_ms",
                "load_avg_1m")


def flood_medians(floods: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over runs of the three p99s and the ratios of each run."""
    out = {k: float(statistics.median(f[k] for f in floods)) for k in _MEDIAN_KEYS}
    for name, num, den in (("flood_over_quiet", "honest_p99_flood_ms", "honest_p99_no_flood_ms"),
                           ("flood_over_control", "honest_p99_flood_ms", "honest_p99_control_ms"),
                           ("control_over_quiet", "honest_p99_control_ms",
                            "honest_p99_no_flood_ms")):
        out[name] = float(statistics.median(f[num] / f[den] for f in floods))
    for phase in ("quiet", "control", "flood"):
        held = [f[phase]["server_held_honest"].get("p99_ms", float("nan"))
                for f in floods if phase in f]
        out[f"server_held_p99_{phase}_ms"] = float(statistics.median(held)) if held \
            else float("nan")
    return out


def _phase_cells(f: dict[str, Any], phase: str) -> str:
    ph = f.get(phase)
    if not ph:
        return "-"
    held = ph["server_held_honest"].get("p99_ms", float("nan"))
    st = ph["server_loop_stalls"]
    cpu = (f"rate {ph.get('flood_rate_per_s', 0.0):.0f}/s; cpu% server "
           f"{ph['server_cpu_pct']:.0f} control {ph.get('control_server_cpu_pct', 0.0):.0f}"
           f" flooder {ph.get('flooder_cpu_pct', 0.0):.0f} honest "
           f"{ph['honest_clients_cpu_pct']:.0f} machine {ph['machine_busy_pct']:.0f}")
    return (f"{ph['honest_p99_ms']:6.1f} ({held:4.1f} in srv; stalls {st['count']}, "
            f"{st['on_cpu_ms']:.0f}/{st['late_ms']:.0f} ms on cpu; {cpu})")


def print_floods(floods: list[dict[str, Any]], flood_ids: int) -> None:
    last = floods[-1]
    print(f"one flooding address ({FLOOD_IP}, {flood_ids:,} made-up ids, default limits) "
          f"against {last['honest_total']} honest ids on {len(HONEST_IPS)} addresses; "
          f"{len(floods)} run(s), each quiet / control / flood")
    print("honest request p99 ms (p99 of the time the server held them; server loop stalls "
          "> 5 ms: count, CPU of the stall time / stall time; CPU % of each process and of "
          "the whole machine: a process 100 = one core, the machine 100 = all cores)")
    for i, f in enumerate(floods):
        print(f"run {i + 1}, load {f['load_avg_1m']:.1f}")
        for phase in ("quiet", "control", "flood"):
            print(f"  {phase:<8} {_phase_cells(f, phase)}")
        print(f"  flood/quiet {f['honest_p99_flood_ms'] / f['honest_p99_no_flood_ms']:.2f}x"
              f"  flood/control "
              f"{f['honest_p99_flood_ms'] / f['honest_p99_control_ms']:.2f}x  "
              f"control/quiet "
              f"{f['honest_p99_control_ms'] / f['honest_p99_no_flood_ms']:.2f}x")
    m = flood_medians(floods)
    print(f"median of {len(floods)}: quiet {m['honest_p99_no_flood_ms']:.1f} / control "
          f"{m['honest_p99_control_ms']:.1f} / flood {m['honest_p99_flood_ms']:.1f} ms; "
          f"flood/quiet {m['flood_over_quiet']:.2f}x, flood/control "
          f"{m['flood_over_control']:.2f}x, control/quiet {m['control_over_quiet']:.2f}x; "
          f"held in server p99 {m['server_held_p99_quiet_ms']:.1f} / "
          f"{m['server_held_p99_control_ms']:.1f} / {m['server_held_p99_flood_ms']:.1f} ms; "
          f"load {m['load_avg_1m']:.1f}")
    print("last run:")
    for label, value, target in flood_summary(last):
        print(f"  {label:<46} {value:>14} {target:>12}")


def flood_ok(flood: dict[str, Any]) -> dict[str, bool]:
    """Each goal of the flood run: met or not."""
    p99_limit = FLOOD_P99_FACTOR_MAX * flood["honest_p99_no_flood_ms"]
    return {
        "p99": flood["honest_p99_flood_ms"] <= p99_limit,
        "p99_vs_control": flood["honest_p99_flood_ms"]
        <= FLOOD_P99_FACTOR_MAX * flood["honest_p99_control_ms"],
        "first_page": flood["honest_in_first_page"] == flood["honest_total"],
        "slowloris": flood["slowloris_open_after_timeout"] == 0,
        "log": flood["server_log_errors"] == 0,
    }


def _stalls_text(summary: dict[str, float] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['count']:.0f} (max {summary['max_ms']:.0f} ms)"


def flood_summary(flood: dict[str, Any]) -> list[tuple[str, str, str]]:
    statuses = flood.get("flood_statuses") or {}
    return [
        ("honest request p99, no flood (ms)", f"{flood['honest_p99_no_flood_ms']:.1f}", ""),
        ("honest request p99, control flood (ms)", f"{flood['honest_p99_control_ms']:.1f}",
         ""),
        ("honest request p99, during the flood (ms)", f"{flood['honest_p99_flood_ms']:.1f}",
         f"<= {FLOOD_P99_FACTOR_MAX:g}x"),
        ("honest client loop stalls >5 ms: no flood/flood",
         f"{_stalls_text(flood.get('honest_client_stalls_no_flood'))} / "
         f"{_stalls_text(flood.get('honest_client_stalls_flood'))}", ""),
        ("flood duration (s)", f"{flood['flood_s'] or 0:.1f}", ""),
        ("server CPU per flood request (us)",
         f"{flood.get('server_cpu_us_per_flood_request', float('nan')):.0f}", ""),
        ("flood answers 200 / 429 / none in time", f"{statuses.get('200', 0)} / "
         f"{statuses.get('429', 0)} / {statuses.get('0', 0)}", ""),
        ("flooder conns accepted / refused at accept / kernel blocks",
         f"{flood['flood'].get('server_flooder_conns_accepted', 0)} / "
         f"{flood['flood'].get('server_flooder_conns_refused', 0)} / "
         f"{flood['flood'].get('server_flooder_kernel_blocks', 0)}", ""),
        ("ids online after the flood", f"{flood['online_after_flood']}", ""),
        ("honest ids in the first page of GET /peers",
         f"{flood['honest_in_first_page']}/{flood['honest_total']}", "all"),
        ("honest ids in a registration answer",
         f"{flood['honest_in_register_answer']}/{flood['register_answer_len']}", ""),
        (f"slowloris sockets open after {flood['slowloris_wait_s']:g} s",
         f"{flood['slowloris_open_after_timeout']}/{SLOWLORIS_CONNECTIONS}", "0"),
        ("ERROR lines in the server log", f"{flood['server_log_errors']}", "0"),
    ]


if __name__ == "__main__":
    sys.exit(main())
