"""Benchmark: throughput of one SecureChannel per transport, against its baselines.

In ONE run, on 127.0.0.1 with uvloop, it measures:

* plain asyncio TCP, no crypto (the ceiling of the machine's loopback + asyncio);
* one-core secretstream encryption (crypto_secretstream_xchacha20poly1305_push),
  one-core libsodium XChaCha20-Poly1305-IETF seal (the frame AEAD of protocol v1)
  and one-core Session.seal for each frame AEAD of protocol v2 (OpenSSL
  AES-256-GCM and ChaCha20-Poly1305 through ``cryptography``), same message size;
* the SecureChannel (handshake + sealed frames) over every transport the
  registry can load, over tcp and udp once per frame AEAD (``--aeads``; both
  nodes forced with P2PFS_AEAD), over quic once (bound to the QUIC connection,
  no second AEAD); UDP also at 1 % and 5 % simulated loss and with 60 KB
  datagrams when ``node.transports.udp`` accepts ``loss_rate`` / ``datagram_bytes``;
* the bare qh3/aioquic stream (1452-byte datagrams) from scripts/bench_quic_libs.py
  when that script exists.

The receiving end of every network row runs in a separate process (this script
with ``--serve``), so sender and receiver each get their own core, as two nodes
would. Time runs from the first byte sent to the receiver's byte count coming
back. Then it prints the ratios the issue sets as targets.

Channel rows also report the CPU time each side spent per MiB (user + system,
from getrusage) and its page faults per MiB. On a shared, loaded machine the
wall-clock rate swings with whoever else runs; CPU per MiB does not, and
``secretstream ms/MiB / max(sender, receiver) ms/MiB`` is the rate the channel
reaches when each side has a core to itself (the "cpu-bound" ratio).

    .venv/bin/python scripts/bench_channel.py                       # 256 MiB, all
    .venv/bin/python scripts/bench_channel.py --size-mib 64 --transports tcp --repeat 3
    .venv/bin/python scripts/bench_channel.py --aeads chacha20poly1305   # one AEAD only
    .venv/bin/python scripts/bench_channel.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nacl.bindings as sodium

from node.channel import accept_channel, open_channel
from node.errors import ChannelClosed, ConfigError
from node.identity import Identity
from node.secure import (
    AEAD_ENV_VAR,
    KNOWN_AEADS,
    InitiatorHandshake,
    ResponderHandshake,
    local_aeads,
)
from node.transports import TRANSPORT_NAMES, get_transport

HOST = "127.0.0.1"
DEFAULT_SIZE_MIB = 256
# 1 MiB messages measured fastest here (256 KiB pays more per-message Python work)
DEFAULT_MESSAGE_BYTES = 1 << 20
LOSS_RATES = (0.01, 0.05)
BIG_DATAGRAM_BYTES = 60_000
BARE_QUIC_DATAGRAM_BYTES = 1452
COUNT = struct.Struct(">Q")
# receiver's report: bytes, CPU microseconds, minor page faults (while receiving)
REPORT = struct.Struct(">QQQ")
SERVER_START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 900.0


def _allow_anyone(peer: Any) -> None:
    return None


def _usage() -> tuple[float, int]:
    """(CPU seconds, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


# --------------------------------------------------------------------------- server side


async def _serve(kind: str, transport: str, kwargs: dict[str, Any]) -> None:
    """Receive one stream of bytes, answer with its byte count, exit."""
    done = asyncio.Event()
    if kind == "plain":
        async def on_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            total = 0
            while data := await reader.read(1 << 20):
                total += len(data)
            writer.write(COUNT.pack(total))
            await writer.drain()
            writer.close()
            done.set()

        server = await asyncio.start_server(on_plain, HOST, 0, limit=1 << 20)
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        await done.wait()
        server.close()
        await server.wait_closed()
        return

    me = Identity.generate("bench-server")

    async def on_pipe(pipe: Any) -> None:
        ch = await accept_channel(pipe, me, authorize=_allow_anyone)
        total = 0
        try:
            msg = await ch.recv()
            cpu0, faults0 = _usage()  # from the first message on: the steady state
            total = len(msg)
            while msg:
                msg = await ch.recv()
                total += len(msg)
            cpu1, faults1 = _usage()
            await ch.send(REPORT.pack(total, int((cpu1 - cpu0) * 1e6), faults1 - faults0))
            await ch.recv()  # wait for the client to hang up
        except ChannelClosed:
            pass
        finally:
            await ch.close()
            done.set()

    listener = await get_transport(transport).listen(HOST, 0, on_pipe, **kwargs)
    print(f"PORT {listener.port}", flush=True)
    await done.wait()
    await listener.close()


@contextlib.contextmanager
def forced_aead(aead: str | None) -> Iterator[None]:
    """Make this process offer only `aead` (None: what it would offer anyway)."""
    old = os.environ.get(AEAD_ENV_VAR)
    if aead is not None:
        os.environ[AEAD_ENV_VAR] = aead
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(AEAD_ENV_VAR, None)
        else:
            os.environ[AEAD_ENV_VAR] = old


class ServerProcess:
    """This script in --serve mode; ended by its own pid when the row is done."""

    def __init__(self, kind: str, transport: str = "tcp", kwargs: dict[str, Any] | None = None):
        self.args = [sys.executable, __file__, "--serve", kind, "--transport", transport,
                     "--serve-kwargs", json.dumps(kwargs or {})]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> int:
        # the server inherits this process's P2PFS_AEAD (see forced_aead)
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"bench server failed to start: {line!r}")
        return int(line.split()[1])

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --------------------------------------------------------------------------- client side


async def plain_tcp_mib_s(size: int, msg: int) -> float:
    with ServerProcess("plain") as port:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        block = os.urandom(msg)
        start = time.perf_counter()
        left = size
        while left > 0:
            n = min(left, msg)
            writer.write(block if n == msg else block[:n])
            await writer.drain()
            left -= n
        writer.write_eof()
        (got,) = COUNT.unpack(await asyncio.wait_for(reader.readexactly(8), RUN_TIMEOUT_S))
        elapsed = time.perf_counter() - start
        writer.close()
        await writer.wait_closed()
    if got != size:
        raise RuntimeError(f"plain tcp: server got {got} of {size} bytes")
    return size / elapsed / (1 << 20)


class ChannelRun:
    """One channel transfer: wall-clock rate, and CPU and page faults per MiB per side."""

    def __init__(self, mib_s: float, sender: tuple[float, int], receiver: tuple[float, int],
                 mib: float, protection: str) -> None:
        self.mib_s = mib_s
        self.protection = protection
        self.sender_ms_per_mib = sender[0] * 1e3 / mib
        self.receiver_ms_per_mib = receiver[0] * 1e3 / mib
        self.sender_faults_per_mib = sender[1] / mib
        self.receiver_faults_per_mib = receiver[1] / mib


async def channel_run(size: int, msg: int, transport: str, kwargs: dict[str, Any]) -> ChannelRun:
    t = get_transport(transport)
    with ServerProcess("channel", transport, kwargs) as port:
        pipe = await t.connect(HOST, port, **kwargs)
        ch = await open_channel(pipe, Identity.generate("bench-client"), expected_peer=None,
                                authorize=_allow_anyone)
        block = os.urandom(msg)
        try:
            cpu0, faults0 = _usage()
            start = time.perf_counter()
            left = size
            while left > 0:
                n = min(left, msg)
                await ch.send(block if n == msg else block[:n])
                left -= n
            await ch.send(b"")
            report = await asyncio.wait_for(ch.recv(), RUN_TIMEOUT_S)
            elapsed = time.perf_counter() - start
            cpu1, faults1 = _usage()
            protection = ch._session.protection
        finally:
            await ch.close()
    got, recv_cpu_us, recv_faults = REPORT.unpack(report)
    if got != size:
        raise RuntimeError(f"{transport} channel: server got {got} of {size} bytes")
    mib = size / (1 << 20)
    return ChannelRun(mib / elapsed, (cpu1 - cpu0, faults1 - faults0),
                      (recv_cpu_us / 1e6, recv_faults), mib, protection)


async def channel_mib_s(size: int, msg: int, transport: str, kwargs: dict[str, Any]) -> float:
    return (await channel_run(size, msg, transport, kwargs)).mib_s


def secretstream_run(size: int, msg: int) -> tuple[float, float]:
    """(MiB/s wall clock, CPU ms per MiB) of one-core secretstream push."""
    key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    block = os.urandom(msg)
    tag = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
    count = max(1, size // msg)
    start, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(count):
        sodium.crypto_secretstream_xchacha20poly1305_push(state, block, None, tag)
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    mib = count * msg / (1 << 20)
    return mib / wall, cpu * 1e3 / mib


def secretstream_mib_s(size: int, msg: int) -> float:
    return secretstream_run(size, msg)[0]


def _one_core(size: int, msg: int, seal: Callable[[bytes], object]) -> tuple[float, float]:
    """(MiB/s wall clock, CPU ms per MiB) of `seal` over `size` bytes of `msg`-byte blocks."""
    block = os.urandom(msg)
    count = max(1, size // msg)
    start, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(count):
        seal(block)
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    mib = count * msg / (1 << 20)
    return mib / wall, cpu * 1e3 / mib


def aead_seal_run(size: int, msg: int, aead: str) -> tuple[float, float]:
    """One-core Session.seal with frame AEAD `aead` (protocol v2)."""
    i = InitiatorHandshake(Identity.generate(), aeads=(aead,))
    r = ResponderHandshake(Identity.generate(), aeads=(aead,))
    _, session = i.receive(r.receive_hello(i.start()))
    return _one_core(size, msg, session.seal)


def libsodium_seal_run(size: int, msg: int) -> tuple[float, float]:
    """One-core libsodium XChaCha20-Poly1305-IETF seal: the frame AEAD of protocol v1."""
    key = os.urandom(32)
    nonce = bytes(24)
    return _one_core(size, msg, lambda block: sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        block, None, nonce, key))


def _accepts(fn: Callable[..., Any], kw: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return kw in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _bare_quic() -> Callable[[str, int, int], Awaitable[float]] | None:
    path = Path(__file__).resolve().parent / "bench_quic_libs.py"
    if not path.exists():
        return None
    sys.path.insert(0, str(path.parent))
    try:
        module = importlib.import_module("bench_quic_libs")
    except Exception as exc:  # noqa: BLE001 - a broken sibling script must not stop us
        print(f"note: scripts/bench_quic_libs.py did not import ({exc}); no bare QUIC rows",
              file=sys.stderr)
        return None
    fn = getattr(module, "bare_stream_mib_s", None)
    return fn if inspect.iscoroutinefunction(fn) else None


# --------------------------------------------------------------------------- driver


async def _median(repeat: int, fn: Callable[[], Awaitable[float]]) -> tuple[float, list[float]]:
    runs = [await fn() for _ in range(repeat)]
    return statistics.median(runs), runs


async def run(size: int, msg: int, transports: list[str], repeat: int,
              aeads: list[str]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def add(key: str, label: str, median: float, runs: list[float],
            **cpu: float) -> None:
        rows.append({"key": key, "row": label, "median_mib_s": round(median, 1),
                     "runs_mib_s": [round(r, 1) for r in runs],
                     **{k: round(v, 3) for k, v in cpu.items()}})

    async def add_channel(key: str, label: str, transport: str,
                          kwargs: dict[str, Any], aead: str | None = None) -> None:
        with forced_aead(aead):
            runs = [await channel_run(size, msg, transport, kwargs) for _ in range(repeat)]
        med = statistics.median
        label = f"{label} [{runs[0].protection}]"
        add(key, label, med(r.mib_s for r in runs), [r.mib_s for r in runs],
            sender_cpu_ms_per_mib=med(r.sender_ms_per_mib for r in runs),
            receiver_cpu_ms_per_mib=med(r.receiver_ms_per_mib for r in runs),
            sender_faults_per_mib=med(r.sender_faults_per_mib for r in runs),
            receiver_faults_per_mib=med(r.receiver_faults_per_mib for r in runs))
        rows[-1]["protection"] = runs[0].protection

    add("plain_tcp", "plain asyncio TCP, no crypto", *await _median(
        repeat, lambda: plain_tcp_mib_s(size, msg)))
    ss_runs = [secretstream_run(size, msg) for _ in range(repeat)]
    add("secretstream", "secretstream push, one core",
        statistics.median(r[0] for r in ss_runs), [r[0] for r in ss_runs],
        cpu_ms_per_mib=statistics.median(r[1] for r in ss_runs))
    def add_one_core(key: str, label: str, fn: Callable[[], tuple[float, float]]) -> None:
        runs = [fn() for _ in range(repeat)]
        add(key, label, statistics.median(r[0] for r in runs), [r[0] for r in runs],
            cpu_ms_per_mib=statistics.median(r[1] for r in runs))

    add_one_core("libsodium_seal", "libsodium xchacha20poly1305 seal (v1), one core",
                 lambda: libsodium_seal_run(size, msg))
    for aead in aeads:
        add_one_core(f"aead_seal_{aead}", f"Session.seal {aead}, one core",
                     lambda aead=aead: aead_seal_run(size, msg, aead))  # type: ignore[misc]
    negotiated = local_aeads()[0]
    notes.append(f"this machine negotiates {negotiated} with a peer like itself "
                 f"(offers {list(local_aeads())}); 'channel_<transport>' is that row")

    for name in transports:
        try:
            t = get_transport(name)
        except ConfigError as exc:
            notes.append(f"{name}: {exc}; no channel row")
            continue
        if name == "quic":  # bound to the QUIC connection: the frame AEAD plays no part
            await add_channel("channel_quic", "SecureChannel over quic", name, {})
            continue
        for aead in aeads:
            key = f"channel_{name}" if aead == negotiated else f"channel_{name}_{aead}"
            await add_channel(key, f"SecureChannel over {name}", name, {}, aead)
        if name != "udp":
            continue
        if _accepts(t.connect, "loss_rate") and _accepts(t.listen, "loss_rate"):
            for loss in LOSS_RATES:
                await add_channel(f"channel_udp_loss_{int(loss * 100)}",
                                  f"SecureChannel over udp, {loss:.0%} loss", "udp",
                                  {"loss_rate": loss})
        else:
            notes.append("udp connect/listen take no loss_rate: lossy rows skipped")
        if _accepts(t.connect, "datagram_bytes") and _accepts(t.listen, "datagram_bytes"):
            await add_channel("channel_udp_60k",
                              f"SecureChannel over udp, {BIG_DATAGRAM_BYTES} B datagrams", "udp",
                              {"datagram_bytes": BIG_DATAGRAM_BYTES})
        else:
            notes.append("udp connect/listen take no datagram_bytes: 60 KB row skipped")

    bare = _bare_quic() if {"udp", "quic"} & set(transports) else None
    if not {"udp", "quic"} & set(transports):
        notes.append("no udp/quic channel row: bare QUIC rows skipped")
    elif bare is None:
        notes.append("scripts/bench_quic_libs.py missing: no bare QUIC rows")
    else:
        bare_fn: Callable[[str, int, int], Awaitable[float]] = bare
        for lib in ("qh3", "aioquic"):
            try:
                importlib.import_module(lib)
            except ImportError:
                notes.append(f"{lib} not installed: no bare row")
                continue

            def bare_run(lib: str = lib) -> Awaitable[float]:
                return bare_fn(lib, size, BARE_QUIC_DATAGRAM_BYTES)

            add(f"bare_{lib}", f"bare {lib} stream, {BARE_QUIC_DATAGRAM_BYTES} B datagrams",
                *await _median(repeat, bare_run))

    return {"benchmark": "channel", "loop": "uvloop", "size_mib": size / (1 << 20),
            "message_bytes": msg, "repeat": repeat, "rows": rows,
            "targets": _targets({r["key"]: r["median_mib_s"] for r in rows})
            + _cpu_targets(rows), "notes": notes}


def _cpu_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The TCP target again from CPU per MiB: the rate with one free core per side."""
    by_key = {r["key"]: r for r in rows}
    ss, ch = by_key.get("secretstream"), by_key.get("channel_tcp")
    if ss is None or ch is None:
        return []
    worst = max(ch["sender_cpu_ms_per_mib"], ch["receiver_cpu_ms_per_mib"])
    ratio = ss["cpu_ms_per_mib"] / worst if worst > 0 else 0.0
    return [{"target": "tcp channel / secretstream, cpu-bound", "goal": 0.7,
             "ratio": round(ratio, 2), "met": ratio >= 0.7}]


def _targets(v: dict[str, float]) -> list[dict[str, Any]]:
    out = []

    def target(name: str, num: str, den: str | list[str], goal: float) -> None:
        dens = [den] if isinstance(den, str) else den
        present = [v[d] for d in dens if d in v]
        if num not in v or not present or max(present) <= 0:
            out.append({"target": name, "goal": goal, "ratio": None, "met": None})
            return
        ratio = v[num] / max(present)
        out.append({"target": name, "goal": goal, "ratio": round(ratio, 2),
                    "met": ratio >= goal})

    target("tcp channel / secretstream one core", "channel_tcp", "secretstream", 0.7)
    target("udp 0% (1452 B) / fastest bare QUIC", "channel_udp", ["bare_qh3", "bare_aioquic"],
           3.0)
    target("udp 60 KB datagrams / tcp channel", "channel_udp_60k", "channel_tcp", 0.5)
    target("udp 5% loss / udp 0% loss", "channel_udp_loss_5", "channel_udp", 0.5)
    target("quic channel / bare qh3 (its library)", "channel_quic", "bare_qh3", 0.8)
    return out


def _print_table(result: dict[str, Any]) -> None:
    print(f"SecureChannel benchmark: {result['size_mib']:g} MiB per row, "
          f"{result['message_bytes'] // 1024} KiB messages, 127.0.0.1, uvloop, "
          f"median of {result['repeat']}")
    print(f"{'row':<72} {'MiB/s':>8} {'tx ms/MiB':>9} {'rx ms/MiB':>9} "
          f"{'tx flt/MiB':>10} {'rx flt/MiB':>10}  runs (MiB/s)")

    def col(r: dict[str, Any], key: str, width: int, fmt: str) -> str:
        return f"{r[key]:>{width}{fmt}}" if key in r else " " * (width - 1) + "-"

    for r in result["rows"]:
        tx = col(r, "sender_cpu_ms_per_mib", 9, ".3f")
        if "cpu_ms_per_mib" in r:
            tx = col(r, "cpu_ms_per_mib", 9, ".3f")
        print(f"{r['row']:<72} {r['median_mib_s']:>8.1f} {tx} "
              f"{col(r, 'receiver_cpu_ms_per_mib', 9, '.3f')} "
              f"{col(r, 'sender_faults_per_mib', 10, '.1f')} "
              f"{col(r, 'receiver_faults_per_mib', 10, '.1f')}  {r['runs_mib_s']}")
    print()
    print(f"{'target':<42} {'goal':>6} {'ratio':>7}  met")
    for t in result["targets"]:
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        print(f"{t['target']:<42} {t['goal']:>5.1f}x {ratio:>7}  {met}")
    for note in result["notes"]:
        print(f"note: {note}")


def _run_loop(coro: Awaitable[Any]) -> Any:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=DEFAULT_SIZE_MIB)
    ap.add_argument("--message-kib", type=int, default=DEFAULT_MESSAGE_BYTES // 1024)
    ap.add_argument("--transports", default=",".join(TRANSPORT_NAMES),
                    help="comma-separated; default tcp,udp,quic (those that load)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--aeads", default=",".join(KNOWN_AEADS),
                    help="comma-separated frame AEADs for the tcp/udp channel rows")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--serve", choices=("plain", "channel"), help=argparse.SUPPRESS)
    ap.add_argument("--transport", default="tcp", help=argparse.SUPPRESS)
    ap.add_argument("--serve-kwargs", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _run_loop(_serve(args.serve, args.transport, json.loads(args.serve_kwargs)))
        return 0
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    aeads = [a.strip() for a in args.aeads.split(",") if a.strip()]
    unknown = [a for a in aeads if a not in KNOWN_AEADS]
    if unknown or not aeads:
        ap.error(f"--aeads: choose from {','.join(KNOWN_AEADS)}")
    result = _run_loop(run(int(args.size_mib * (1 << 20)), args.message_kib * 1024,
                           transports, max(1, args.repeat), aeads))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
