"""NAT lab scenarios of the relay (real node processes behind real MASQUERADE NATs):

(c) both hosts behind ``MASQUERADE --random-fully`` routers (symmetric-like, no hole
    punch): ping says ``relayed``, a shared file arrives byte-identical, and nothing
    the relay forwarded contains the file's bytes;
(e) a relay that flips one byte of the stream: the share fails with an integrity /
    authentication error and no file appears.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.netns.nat_lab import INTERNET_ADDR, NatLab, wait_until
from tests.netns.nat_world import RELAY_PORT, start_world

FILE_BYTES = 4 * 1024 * 1024
WINDOW_BYTES = 16


def test_c_random_fully_nats_share_through_the_relay(
        nat_lab: Callable[..., NatLab], tmp_path: Path) -> None:
    lab = nat_lab(random_fully=True)
    world = start_world(lab)
    t0 = time.monotonic()
    ping = world.cli("a", "ping", world.ids["b"], "--count", "2")
    print(f"lab: relayed ping in {time.monotonic() - t0:.1f} s")
    assert isinstance(ping, dict)
    assert ping["path"] == "relayed", ping
    assert ping["relay"] == f"{INTERNET_ADDR}:{RELAY_PORT}"
    assert ping["remote"][0] == INTERNET_ADDR

    payload = os.urandom(FILE_BYTES)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    res = lab.node_cli(world.homes["a"], "share", str(src), "--to", "b", timeout_s=120)
    assert res.returncode == 0, res.stderr + res.stdout + world.logs()
    print(f"lab: ping + share of {FILE_BYTES >> 20} MiB in {time.monotonic() - t0:.1f} s")
    got = world.homes["b"] / "received" / "a" / "payload.bin"
    wait_until(got.exists, 30, "b has the file", world.logs)
    assert got.read_bytes() == payload

    captured = world.capture.read_bytes()
    assert len(captured) > FILE_BYTES  # the file went through the relay ...
    step = 8191
    for off in range(0, FILE_BYTES - WINDOW_BYTES, step):  # ... but never in the clear
        assert payload[off:off + WINDOW_BYTES] not in captured, f"plaintext at offset {off}"


def test_e_tampering_relay_is_detected(nat_lab: Callable[..., NatLab],
                                       tmp_path: Path) -> None:
    lab = nat_lab(random_fully=True)
    # past every handshake of the ping and share channels: inside file data
    world = start_world(lab, tamper_after=2 * 1024 * 1024)
    payload = os.urandom(FILE_BYTES)
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    res = lab.node_cli(world.homes["a"], "share", str(src), "--to", "b", timeout_s=120)
    # b's channel died on the flipped byte: AEAD authentication failed, nothing forged
    # was accepted; the transfer then either fails or resumes over a fresh circuit
    node_log = (world.homes["b"] / "node.log").read_text() + world.logs()
    assert "failed authentication" in node_log, node_log
    got = world.homes["b"] / "received" / "a" / "payload.bin"
    if res.returncode == 0:
        assert got.read_bytes() == payload
    else:
        assert not got.exists()
