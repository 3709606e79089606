"""NAT lab scenarios of hole punching (real node processes behind real MASQUERADE NATs
that keep ports and drop every unsolicited inbound packet: "port-restricted cone"):

(b) the first ping goes through the relay and starts a punch; a later ping reports
    ``hole-punched``, and a 20 MB share arrives byte-identical without going through
    the relay (the relay forwarded far less than the file);
(d) a 20 MB share starts over a slow relay while udp between the NATs is blocked;
    then udp is let through, a punch succeeds (which closes the relayed transfer
    channel, so that it moves), and the relay is killed mid-transfer: the transfer's
    retry dials the punched path and resumes from its verified chunks, and the file
    arrives byte-identical.
"""

from __future__ import annotations

import asyncio
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

from node.control import ControlClient
from tests.netns.nat_lab import NatLab, wait_until
from tests.netns.nat_world import World, start_world

FILE_BYTES = 20 * 1024 * 1024
PUNCH_TIMEOUT_S = 20.0


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
    # either side may have punched first (gossip dials both ways): a knows the path
    status = world.cli("a", "status")
    assert isinstance(status, dict)
    assert any(world.ids["b"].startswith(short) for short in status["punch"]["punched"]), \
        status["punch"]
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
    # no punch can succeed yet, and the relay is slow (2 MiB/s): the share starts and
    # stays on the relay until the test lets a punch through
    lab.block_udp_between_routers()
    world = start_world(lab, throttle_mib_s=2.0)
    payload = os.urandom(FILE_BYTES)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    share = subprocess.Popen(
        [sys.executable, "-m", "node", "share", str(src), "--to", "b", "--json",
         "--home", str(world.homes["a"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=lab.env(), cwd=lab.root, stdin=subprocess.DEVNULL)
    lines: list[str] = []

    def read_lines() -> None:
        for line in share.stdout or ():
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        def relayed_bytes() -> int:
            return world.capture.stat().st_size if world.capture.exists() else 0

        wait_until(lambda: relayed_bytes() > 2 * 1024 * 1024 or share.poll() is not None,
                   20, "the share is under way over the relay", world.logs)
        lab.block_udp_between_routers(False)

        def punch() -> dict[str, Any]:
            return dict(asyncio.run(ControlClient(world.homes["a"]).call(
                "punch", {"peer": world.ids["b"]}, timeout_s=30)))

        # a punch started while udp was blocked may still be running, and the request
        # then waits for it: if its last attempt went out before the unblock, punch again
        outcome = punch()
        if not outcome["ok"]:
            outcome = punch()
        assert outcome["ok"], outcome
        assert share.poll() is None, "the share finished before the relay could be killed"
        # the punch closed the relayed transfer channel: its retry goes direct anyway
        node_log = (world.homes["a"] / "node.log").read_text(errors="replace")
        assert "moving a relayed transfer channel" in node_log, node_log[-3000:]
        os.killpg(world.relay.popen.pid, signal.SIGKILL)
        world.relay.popen.wait(5)
        relayed = relayed_bytes()
        print(f"lab: punched after {outcome['elapsed_ms']:.0f} ms; relay killed after "
              f"forwarding {relayed >> 20} MiB")
        share.wait(60)
        reader.join(10)
        assert share.returncode == 0, "".join(lines) + world.logs()
    finally:
        if share.poll() is None:
            share.kill()
            share.wait(10)
        reader.join(10)
        if share.stdout is not None:
            share.stdout.close()
    got = world.homes["b"] / "received" / "a" / "payload.bin"
    wait_until(got.exists, 30, "b has the file", world.logs)
    assert got.read_bytes() == payload
    # it started on the relay and was resumed over the punched path, not restarted
    assert relayed < FILE_BYTES
    rows = world.cli("a", "transfers")
    assert isinstance(rows, list)
    transfer = next(r for r in rows if r["direction"] == "send" and r["state"] == "done")
    assert transfer["attempts"] >= 2, rows
    print(f"lab: finished after {transfer['attempts']} attempts")
