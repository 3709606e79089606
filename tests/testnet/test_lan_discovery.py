"""LAN discovery with real node processes on 127.0.0.1: no bootstrap server, no
--bootstrap-peer; nodes find each other by their signed announcements (explicit
unicast targets stand in for broadcast/multicast on loopback), list each other
with source `lan` within 5 s, and share a file. tests/netns/test_lan_netns.py runs
the same with real broadcast/multicast between network namespaces.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id  # noqa: E402

pytestmark = pytest.mark.slow

LAN_FOUND_WITHIN_S = 5.0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _log_time(path: Path, needle: str) -> float:
    """The time of the first log line containing `needle` (seconds since the epoch)."""
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    raise AssertionError(f"no line with {needle!r} in {path}")


def _lan_peers(net: Testnet, name: str) -> dict[str, dict[str, object]]:
    rows = net.cli(name, "peers")
    return {normalize_peer_id(r["peer_id"]): r for r in rows if "lan" in r["source"]}


def test_two_nodes_without_bootstrap_find_each_other_on_the_lan(tmp_path: Path) -> None:
    with Testnet(tmp_path / "net") as net:
        names = ["a", "b", "off"]
        handles = net.add_nodes(names, bootstrap=False, start=False)
        lan_ports = {h.name: net.ports.allocate() for h in handles}
        targets = [f"127.0.0.1:{p}" for p in lan_ports.values()]
        for h in handles:
            (h.home / "config.toml").write_text(
                f"lan_discovery_port = {lan_ports[h.name]}\n"
                f"lan_announce_targets = {json.dumps(targets)}\n"
                + ("lan_discovery = false\n" if h.name == "off" else ""))
        net.start_many(["off", "a"])
        t_start = time.monotonic()
        net.start("b")
        t_ready = time.monotonic()
        ida, idb, idoff = (normalize_peer_id(net.peer_id(n)) for n in names)

        def found() -> bool:
            return idb in _lan_peers(net, "a") and ida in _lan_peers(net, "b")

        net.wait_until(found, timeout=15, what="a and b list each other with source lan")
        now = time.monotonic()
        # the nodes' own log lines time it exactly (`node peers` polls cost ~1 s each here)
        b_up = _log_time(net.node("b").home / "node.log", " (b) is up")
        a_heard_b = _log_time(net.node("a").home / "node.log", "LAN: heard ")
        b_heard_a = _log_time(net.node("b").home / "node.log", "LAN: heard ")
        print(f"b up -> a heard b {a_heard_b - b_up:.3f} s, b heard a {b_heard_a - b_up:.3f} s; "
              f"`node peers` of both showed it {now - t_ready:.2f} s after b was ready "
              f"({now - t_start:.2f} s after its start command)")
        assert max(a_heard_b, b_heard_a) - b_up < LAN_FOUND_WITHIN_S
        row = _lan_peers(net, "a")[idb]
        assert row["source"] == "lan" and row["online"]
        status = net.cli("a", "status")
        assert status["lan_discovery"]["enabled"] and status["lan_discovery"]["peers"] == 1
        # the node with lan_discovery = false neither announced nor listened
        assert net.cli("off", "status")["lan_discovery"] == {"enabled": False}
        assert idoff not in _lan_peers(net, "a") and idoff not in _lan_peers(net, "b")
        assert net.cli("off", "peers") == []

        net.trust_all(["a", "b"])
        src = tmp_path / "lan.bin"
        src.write_bytes(b"found on the LAN\n" * 5000)
        net.cli("a", "share", str(src), "--to", "b", json=False)
        got = net.node("b").home / "received" / "a" / "lan.bin"
        net.wait_until(got.exists, timeout=15, what="b received the file")
        assert _sha(got) == _sha(src)


def test_status_shows_observed_addresses_from_bootstrap_and_dht(tmp_path: Path) -> None:
    """Real processes: the bootstrap server's `observed` answer and the DHT stun RPC
    reach `node status`; on 127.0.0.1 they equal the local address, so the record
    advertises nothing extra (and keeps its 8-field encoding)."""
    with Testnet(tmp_path / "net") as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["a", "b"])

        def observed() -> set[str]:
            return {o["via"] for o in net.cli("a", "status")["observed"]
                    if o["host"] == "127.0.0.1"}

        net.wait_until(lambda: observed() == {"bootstrap", "dht"}, timeout=30,
                       what="a saw itself through the bootstrap server and a DHT peer")
        status = net.cli("a", "status")
        dht_seen = [o for o in status["observed"] if o["via"] == "dht"]
        assert dht_seen[0]["port"] == status["ports"]["dht"]  # the DHT socket, as mapped
        assert status["advertised_observed"] == []
        assert status["lan_discovery"] == {"enabled": False}  # listening on loopback only
        text = net.cli("a", "status", json=False).stdout
        assert "observed" in text and "via bootstrap" in text and "lan           off" in text
