"""The daemon as a user runs it: one per home dir, clean and quick stop, unregisters,
survives a dead bootstrap server, logs to its home dir (issue 2, item 6)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id  # noqa: E402

pytestmark = pytest.mark.slow


def _online_ids(url: str) -> set[str]:
    with urllib.request.urlopen(url + "/peers?limit=1000", timeout=5) as resp:
        body = json.load(resp)
    return {normalize_peer_id(p["device_id"]) for p in body["peers"]}


def test_second_start_refuses_and_sigterm_stops_fast_and_unregisters(tmp_path: Path) -> None:
    with Testnet(tmp_path) as net:
        net.start_bootstrap(ttl_s=120)
        net.add_nodes(["a", "b"])
        a = net.node("a")
        a_id = normalize_peer_id(net.peer_id("a"))
        net.wait_until(lambda: a_id in _online_ids(net.bootstrap_url), 20, what="a registered")

        second = subprocess.run(
            [sys.executable, "-m", "node", "start", "--home", str(a.home), "--tcp-port", "0",
             "--udp-port", "0", "--quic-port", "0", "--dht-port", "0"],
            capture_output=True, text=True, timeout=30)
        assert second.returncode != 0
        assert "already running" in second.stderr, second.stderr

        assert a.process is not None
        t0 = time.monotonic()
        a.process.popen.send_signal(signal.SIGTERM)
        a.process.popen.wait(timeout=10)
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"stop took {elapsed:.2f} s"
        assert a.process.popen.returncode == 0
        # a clean shutdown unregisters at once, long before the 120 s TTL
        assert a_id not in _online_ids(net.bootstrap_url)
        assert normalize_peer_id(net.peer_id("b")) in _online_ids(net.bootstrap_url)
        assert not (a.home / "daemon.json").exists()
        log_text = (a.home / "node.log").read_text()
        assert "is up" in log_text and "stopped" in log_text
        # the identity's seed never reaches a log
        assert "seed" not in log_text.lower()


def test_dead_bootstrap_server_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    with Testnet(tmp_path) as net:
        net.start_bootstrap(ttl_s=60)
        url = net.bootstrap_url
        net.kill_bootstrap()
        node = net.add_node("lonely")
        status = net.cli("lonely", "status")
        assert normalize_peer_id(status["peer_id"]) == normalize_peer_id(net.peer_id("lonely"))
        net.wait_until(lambda: "retrying" in node.node_log.read_text(), 15,
                       what="a retry warning in the node log")
        assert url in node.node_log.read_text()
        assert node.running()
        # the server comes back on the same port: the node registers with it again
        net.start_bootstrap(ttl_s=60)
        lonely_id = normalize_peer_id(net.peer_id("lonely"))
        net.wait_until(lambda: lonely_id in _online_ids(net.bootstrap_url), 40,
                       what="re-registered after the server came back")
