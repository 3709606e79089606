"""NAT lab scenarios of hole punching (real node processes behind real MASQUERADE NATs
that keep ports and drop every unsolicited inbound packet: "port-restricted cone"):

(b) the first ping goes through the relay and starts a punch; a later ping reports
    ``hole-punched``, and a 20 MB share arrives byte-identical without going through
    the relay (the relay forwarded far less than the file);
(d) after a punch succeeded, the relay is killed in the middle of a 20 MB share
    (udp slowed to ~4 MiB/s by the routers so that there is a middle): the share
    finishes, byte-identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.netns.nat_lab import NatLab, wait_until
from tests.netns.nat_world import World, start_world

FILE_BYTES = 20 * 1024 * 1024
PUNCH_TIMEOUT_S = 20.0
UDP_PACKETS_PER_S = 3000  # x 1452-byte datagrams: about 4 MiB/s


def ping(world: World) -> dict[str, Any]:
    reply = world.cli("a", "ping", world.ids["b"], "--count", "1")
    assert isinstance(reply, dict)
    return reply


def wait_for_punched_ping(world: World) -> dict[str, Any]:
    first = ping(world)
    print(f"lab: first ping {first['path']} in {first['handshake_ms']:.0f} ms")
    assert first["path"] in ("relayed", "hole-punched"), first
    last: list[dict[str, Any]] = [first]

    def punched() -> bool:
        if last[-1]["path"] != "hole-punched":
            last.append(ping(world))
        return last[-1]["path"] == "hole-punched"

    wait_until(punched, PUNCH_TIMEOUT_S, "a ping reports the hole-punched path",
               lambda: json.dumps(last[-3:]) + world.logs())
    return last[-1]


def test_b_port_restricted_nats_hole_punch(nat_lab: Callable[..., NatLab],
                                           tmp_path: Path) -> None:
    lab = nat_lab(random_fully=False)
    world = start_world(lab)
    t0 = time.monotonic()
    reply = wait_for_punched_ping(world)
    print(f"lab: hole-punched ping after {time.monotonic() - t0:.1f} s: {reply}")
    assert reply["transport"] == "udp" and reply["relay"] is None
    assert reply["remote"][0] == "198.18.0.12"  # b's router, not the relay
    status = world.cli("a", "status")
    assert isinstance(status, dict) and status["punch"]["succeeded"] >= 1, status
    relayed_before = world.capture.stat().st_size

    payload = os.urandom(FILE_BYTES)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    t1 = time.monotonic()
    res = lab.node_cli(world.homes["a"], "share", str(src), "--to", "b", timeout_s=120)
    assert res.returncode == 0, res.stderr + res.stdout + world.logs()
    print(f"lab: hole-punched share of {FILE_BYTES >> 20} MiB in {time.monotonic() - t1:.1f} s")
    got = world.homes["b"] / "received" / "a" / "payload.bin"
    wait_until(got.exists, 30, "b has the file", world.logs)
    assert got.read_bytes() == payload
    # the file took the punched path: the relay forwarded a few handshakes, not 20 MB
    assert world.capture.stat().st_size - relayed_before < FILE_BYTES // 20


def test_d_relay_killed_mid_transfer_after_a_punch(nat_lab: Callable[..., NatLab],
                                                  tmp_path: Path) -> None:
    lab = nat_lab(random_fully=False)
    world = start_world(lab)
    wait_for_punched_ping(world)
    # ~4 MiB/s of udp through the routers: the share lasts seconds, not one
    lab.limit_udp(UDP_PACKETS_PER_S)
    payload = os.urandom(FILE_BYTES)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    share = subprocess.Popen(
        [sys.executable, "-m", "node", "share", str(src), "--to", "b", "--json",
         "--home", str(world.homes["a"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=lab.env(), cwd=lab.root, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    assert share.stdout is not None
    def read_lines() -> None:
        for line in share.stdout or ():
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        def progress() -> int:
            done = [json.loads(line).get("event", {}).get("bytes_done", 0)
                    for line in list(lines) if line.startswith('{"event"')]
            return max(done, default=0)

        # the share's own progress events (--json): no CLI process per poll
        wait_until(lambda: progress() > 0 or share.poll() is not None, 20,
                   "the share is under way", world.logs)
        assert share.poll() is None, "the share finished before the relay could be killed"
        sent = progress()
        os.killpg(world.relay.popen.pid, signal.SIGKILL)
        world.relay.popen.wait(5)
        print(f"lab: relay killed with {sent >> 20} of {FILE_BYTES >> 20} MiB sent")
        share.wait(60)
        reader.join(10)
        assert share.returncode == 0, "".join(lines) + world.logs()
    finally:
        if share.poll() is None:
            share.kill()
            share.wait(10)
        reader.join(10)
        share.stdout.close()
    got = world.homes["b"] / "received" / "a" / "payload.bin"
    wait_until(got.exists, 30, "b has the file", world.logs)
    assert got.read_bytes() == payload
    assert not world.relay.alive()
