"""Benchmark: one bare bidirectional QUIC stream with aioquic vs qh3 on 127.0.0.1.

No p2pfs code is on the data path (only the self-signed certificate helper):
the client opens one stream, writes SIZE bytes in 1 MiB writes with the
library's own StreamWriter (no backpressure: neither library's drain() paces), sends FIN,
and waits for the server's 8-byte byte count + FIN. Throughput is SIZE divided
by the time from the first write to that answer.

    .venv/bin/python scripts/bench_quic_libs.py                 # 100 MiB, 1200 & 1452
    .venv/bin/python scripts/bench_quic_libs.py --size-mib 32 --repeat 3 --json

``bare_stream_mib_s(lib, size_bytes, datagram_bytes)`` is imported by
scripts/bench_channel.py to compare the QUIC channel with the library it runs on.
Must not import node.transports.quic or anything above it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.transports.certs import load_or_create_cert

LIBS = ("aioquic", "qh3")
DATAGRAM_SIZES_BYTES = (1200, 1452)
DEFAULT_SIZE_MIB = 100
WRITE_CHUNK_BYTES = 1 << 20
ALPN = "p2pfs-bench"
BENCH_TIMEOUT_S = 600.0


def _configs(lib: str, datagram_bytes: int) -> tuple[Any, Any]:
    cfg_mod = importlib.import_module(f"{lib}.quic.configuration")
    cert_pem, key_pem = load_or_create_cert(None)
    server = cfg_mod.QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                                       max_datagram_size=datagram_bytes)
    if lib == "qh3":
        server.load_cert_chain(cert_pem, key_pem)
    else:
        # aioquic loads files only
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            c, k = Path(tmp, "c.pem"), Path(tmp, "k.pem")
            c.write_bytes(cert_pem)
            k.write_bytes(key_pem)
            server.load_cert_chain(c, k)
    import ssl

    client = cfg_mod.QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                       max_datagram_size=datagram_bytes,
                                       verify_mode=ssl.CERT_NONE)
    return server, client


async def bare_stream_mib_s(lib: str, size_bytes: int, datagram_bytes: int) -> float:
    """MiB/s of one bare `lib` ("aioquic" | "qh3") stream carrying `size_bytes` on 127.0.0.1."""
    if lib not in LIBS:
        raise ValueError(f"lib must be one of {LIBS}")
    aio = importlib.import_module(f"{lib}.asyncio")
    server_cfg, client_cfg = _configs(lib, datagram_bytes)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def drain_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            total += len(data)
        writer.write(struct.pack(">Q", total))
        writer.write_eof()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = loop.create_task(drain_stream(reader, writer))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    server = await aio.serve("127.0.0.1", 0, configuration=server_cfg, stream_handler=on_stream)
    try:
        port = server._transport.get_extra_info("sockname")[1]
        async with aio.connect("127.0.0.1", port, configuration=client_cfg) as client:
            reader, writer = await client.create_stream()
            chunk = os.urandom(WRITE_CHUNK_BYTES)
            start = time.perf_counter()
            left = size_bytes
            while left > 0:
                n = min(left, len(chunk))
                writer.write(chunk[:n] if n < len(chunk) else chunk)
                # the libraries' drain() cannot be awaited (no protocol behind the writer)
                # and would not pace anyway; just let the loop transmit between writes
                await asyncio.sleep(0)
                left -= n
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), BENCH_TIMEOUT_S)
            elapsed = time.perf_counter() - start
            (received,) = struct.unpack(">Q", answer[:8])
            if received != size_bytes:
                raise RuntimeError(f"{lib}: server got {received} of {size_bytes} bytes")
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.sleep(0)
    return size_bytes / elapsed / (1 << 20)


async def pipe_mib_s(size_bytes: int, message_bytes: int = 1 << 20) -> float:
    """MiB/s of p2pfs's QuicPipe (no encryption) moving `size_bytes` in `message_bytes` messages.

    Same shape as bare_stream_mib_s: the receiver answers once it has everything.
    """
    from node.errors import ChannelClosed
    from node.transports import quic  # imported here: the bare numbers never load it

    async def count(pipe: Any) -> None:
        got = 0
        try:
            while got < size_bytes:
                got += len(await pipe.recv())
            await pipe.send(struct.pack(">Q", got))
            await pipe.recv()
        except ChannelClosed:
            pass

    listener = await quic.listen("127.0.0.1", 0, count)
    pipe = await quic.connect("127.0.0.1", listener.port)
    try:
        block = os.urandom(message_bytes)
        start = time.perf_counter()
        left = size_bytes
        while left > 0:
            n = min(left, message_bytes)
            await pipe.send(block if n == message_bytes else block[:n])
            left -= n
        (received,) = struct.unpack(">Q", await asyncio.wait_for(pipe.recv(), BENCH_TIMEOUT_S))
        elapsed = time.perf_counter() - start
        if received != size_bytes:
            raise RuntimeError(f"pipe: peer got {received} of {size_bytes} bytes")
    finally:
        await pipe.close()
        await listener.close()
    return size_bytes / elapsed / (1 << 20)


async def _run(size_bytes: int, libs: list[str], sizes: list[int], repeat: int,
               with_pipe: bool = False) -> list[dict]:
    rows = []
    if with_pipe:
        from node.transports import quic

        runs = [await pipe_mib_s(size_bytes) for _ in range(repeat)]
        rows.append({"lib": "p2pfs-pipe", "version": "qh3", "datagram_bytes":
                     quic.MAX_DATAGRAM_BYTES, "size_mib": size_bytes / (1 << 20),
                     "runs_mib_s": [round(r, 2) for r in runs],
                     "median_mib_s": round(statistics.median(runs), 2)})
    for dgram in sizes:
        for lib in libs:
            runs = [await bare_stream_mib_s(lib, size_bytes, dgram) for _ in range(repeat)]
            rows.append({"lib": lib, "version": importlib.import_module(lib).__version__,
                         "datagram_bytes": dgram, "size_mib": size_bytes / (1 << 20),
                         "runs_mib_s": [round(r, 2) for r in runs],
                         "median_mib_s": round(statistics.median(runs), 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=DEFAULT_SIZE_MIB)
    ap.add_argument("--lib", action="append", choices=LIBS, help="default: both")
    ap.add_argument("--datagram-bytes", type=int, action="append",
                    help="default: 1200 and 1452")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--pipe", action="store_true",
                    help="also time p2pfs's QuicPipe (qh3, no encryption) in 1 MiB messages")
    args = ap.parse_args(argv)
    import uvloop

    size = int(args.size_mib * (1 << 20))
    rows = uvloop.run(_run(size, args.lib or list(LIBS),
                           args.datagram_bytes or list(DATAGRAM_SIZES_BYTES), args.repeat,
                           args.pipe))
    if args.json:
        print(json.dumps({"benchmark": "bare_quic_stream", "loop": "uvloop", "rows": rows},
                         indent=2))
    else:
        print(f"bare QUIC stream, {args.size_mib:g} MiB, 127.0.0.1, uvloop, "
              f"median of {args.repeat}")
        print(f"{'library':<16}{'datagram B':>12}{'MiB/s':>10}   runs")
        for r in rows:
            print(f"{r['lib'] + ' ' + r['version']:<16}{r['datagram_bytes']:>12}"
                  f"{r['median_mib_s']:>10.2f}   {r['runs_mib_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
