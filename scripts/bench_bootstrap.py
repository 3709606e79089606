"""Benchmark of the bootstrap server: signed registrations/s and GET /peers latency.

The server runs as its own process (``python -m bootstrap``, uvloop) on
127.0.0.1; this process is the load generator. Records are signed ahead of
time, so the numbers measure the server, which still verifies every signature.

    .venv/bin/python scripts/bench_bootstrap.py            # table
    .venv/bin/python scripts/bench_bootstrap.py --json     # machine-readable
    .venv/bin/python scripts/bench_bootstrap.py --runs 5 --concurrency 64

Each figure is the median over ``--runs`` runs (a fresh server and database per
run). Targets on a 2-core machine: >= 2,000 signed registrations/s and
GET /peers?limit=200 p99 < 50 ms with 100k registered peers.
Imports the bootstrap package and node.identity/contact only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
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


class ServerProcess:
    """`python -m bootstrap` on a free port; stopped with SIGTERM."""

    def __init__(self, db: Path, ttl_s: float) -> None:
        self.log_path = db.with_suffix(".log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0",
             "--db", str(db), "--ttl", str(ttl_s)],
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
                cur = rng.choice(ids).encode()
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


def one_run(args: argparse.Namespace, bodies: list[bytes], templates: list[str],
            workdir: Path, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    db = workdir / f"reg-{run}.sqlite3"
    srv = ServerProcess(db, 3600)
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
        srv = ServerProcess(db, 3600)
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
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    bodies = make_bodies(args.peers)
    templates = [json.dumps(json.loads(b)["record"], separators=(",", ":"))
                 for b in bodies[:1000]]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-bootstrap-") as tmp:
        for run in range(args.runs):
            runs.append(one_run(args, bodies, templates, Path(tmp), run))

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
