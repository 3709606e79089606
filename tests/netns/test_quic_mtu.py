"""QUIC over a path whose MTU (1280) is below Ethernet's: the channel must not stall.

Three namespaces: host A -- 1500-byte link -- router R -- 1280-byte link -- host B
(198.18.10.0/24 and 198.18.11.0/24, RFC 2544 space, nothing in the root
namespace). A's first hop says 1500, so only a datagram size every QUIC path
carries (1200 bytes, RFC 9000 §14) gets through; with 1452-byte datagrams the
connection stalled (docs/protocols/quic.md, "Known limit"). B runs a QUIC echo
listener, A sends 2 MiB through it and checks what comes back.

Root only (skipped with the reason otherwise); the namespaces are deleted after
the test whatever happens (and by an atexit hook if the process dies early).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.lan_lab import skip_reason

REPO = Path(__file__).resolve().parents[2]
PORT = 4433
SERVER_ADDR = "198.18.11.2"
SMALL_MTU = 1280
TRANSFER_BYTES = 2 * 1024 * 1024
DEADLINE_S = 40.0

SERVER = textwrap.dedent(f"""
    import asyncio, sys
    from node.transports import quic

    async def echo(pipe):
        while True:
            await pipe.send(bytes(await pipe.recv()))

    async def main():
        await quic.listen("{SERVER_ADDR}", {PORT}, echo)
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")

CLIENT = textwrap.dedent(f"""
    import asyncio, hashlib, os
    from node.transports import quic

    async def main():
        pipe = await quic.connect("{SERVER_ADDR}", {PORT}, timeout=10)
        print("datagram", pipe._quic._configuration.max_datagram_size, flush=True)
        sent, got = hashlib.sha256(), hashlib.sha256()
        n = 0

        async def reader():
            nonlocal n
            while n < {TRANSFER_BYTES}:
                m = await pipe.recv()
                got.update(m)
                n += len(m)

        task = asyncio.create_task(reader())
        for _ in range({TRANSFER_BYTES} // 65536):
            m = os.urandom(65536)
            sent.update(m)
            await pipe.send(m)
        await asyncio.wait_for(task, 30)
        assert sent.digest() == got.digest()
        await pipe.close()
        print("ok", flush=True)

    asyncio.run(main())
""")


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10,
                   stdin=subprocess.DEVNULL)


@pytest.fixture
def small_mtu_path() -> Iterator[tuple[str, str]]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"netns lab skipped: {reason}")
    tag = f"p2pmtu-{os.getpid()}"
    a, r, b = f"{tag}-a", f"{tag}-r", f"{tag}-b"
    made: list[str] = []

    def teardown() -> None:
        for ns in reversed(made):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _ip("netns", "del", ns)
        made.clear()

    atexit.register(teardown)
    try:
        for ns in (a, r, b):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", "eth0", "netns", a, "type", "veth", "peer", "name", "ra", ns=r)
        _ip("link", "add", "eth0", "netns", b, "type", "veth", "peer", "name", "rb", ns=r)
        _ip("link", "set", "rb", "mtu", str(SMALL_MTU), ns=r)
        _ip("link", "set", "eth0", "mtu", str(SMALL_MTU), ns=b)
        _ip("addr", "add", "198.18.10.1/24", "dev", "eth0", ns=a)
        _ip("addr", "add", "198.18.10.2/24", "dev", "ra", ns=r)
        _ip("addr", "add", "198.18.11.1/24", "dev", "rb", ns=r)
        _ip("addr", "add", f"{SERVER_ADDR}/24", "dev", "eth0", ns=b)
        for ns, dev in ((a, "eth0"), (r, "ra"), (r, "rb"), (b, "eth0")):
            _ip("link", "set", dev, "up", ns=ns)
        _ip("route", "add", "default", "via", "198.18.10.2", ns=a)
        _ip("route", "add", "default", "via", "198.18.11.1", ns=b)
        subprocess.run(["ip", "netns", "exec", r, "sysctl", "-q", "-w",
                        "net.ipv4.ip_forward=1"], check=True, capture_output=True, timeout=10)
        yield a, b
    finally:
        teardown()
        atexit.unregister(teardown)


def _python(ns: str, code: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def test_quic_channel_crosses_a_1280_byte_mtu_path(small_mtu_path: tuple[str, str]) -> None:
    a, b = small_mtu_path
    server = subprocess.Popen(_python(b, SERVER), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline and server.poll() is None:
            ready, _, _ = select.select([server.stdout], [], [], 0.2)
            if ready:
                line = server.stdout.readline().strip()
                break
        assert line == "ready", f"QUIC server did not start: {line!r} {server.poll()}"
        try:
            res = subprocess.run(_python(a, CLIENT), capture_output=True, text=True,
                                 env=_env(), cwd=REPO, timeout=DEADLINE_S,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QUIC stalled on a {SMALL_MTU}-byte MTU path "
                        f"(no echo within {DEADLINE_S:g} s)")
        assert res.returncode == 0, res.stderr[-2000:]
        lines = res.stdout.split()
        assert lines[-1] == "ok", res.stdout
        assert int(lines[lines.index("datagram") + 1]) <= SMALL_MTU - 28  # fits IPv4 + UDP
    finally:
        server.kill()
        server.wait(timeout=10)
        for stream in (server.stdout, server.stderr):
            if stream is not None:
                stream.close()
