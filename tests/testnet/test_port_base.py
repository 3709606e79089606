"""`--port P` sets every port of a node (tcp P, udp P+1, quic P+2, dht P+3, dashboard P+4),
so two nodes that differ only in --home and --port run side by side on one machine
(issue 3, item 15)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, TestnetError, normalize_peer_id  # noqa: E402

pytestmark = pytest.mark.slow

PORTS_PER_NODE = 5  # tcp, udp, quic, dht and the dashboard
STOP_TIMEOUT_S = 10


def _free_port_run(avoid: set[int]) -> int:
    """A port P such that P..P+4 are free for TCP and UDP on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        run = set(range(base, base + PORTS_PER_NODE))
        if base + PORTS_PER_NODE > 65535 or run & avoid:
            continue
        held: list[socket.socket] = []
        try:
            for port in sorted(run):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    held.append(s)
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return base
    raise RuntimeError(f"no run of {PORTS_PER_NODE} free ports on 127.0.0.1")


def test_two_nodes_differing_only_in_home_and_port(tmp_path: Path) -> None:
    with Testnet(tmp_path) as net:
        net.start_bootstrap(ttl_s=60)
        names = ["a", "b"]
        for name in names:
            net.add_node(name, start=False)  # `node init` only
        bases: dict[str, int] = {}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in names:
                taken = {p for b in bases.values()
                         for p in range(b - PORTS_PER_NODE + 1, b + PORTS_PER_NODE)}
                bases[name] = _free_port_run(taken)
                log = (tmp_path / f"{name}.out").open("wb")
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "node", "start", "--home", str(net.node(name).home),
                     "--port", str(bases[name]), "--bootstrap", net.bootstrap_url],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={k: v for k, v in os.environ.items() if not k.startswith("P2PFS_")},
                    start_new_session=True)
                log.close()

            def status_when_up(name: str) -> dict[str, Any] | None:
                if procs[name].poll() is not None:
                    out = (tmp_path / f"{name}.out").read_text(errors="replace")
                    raise TestnetError(f"node {name} exited {procs[name].returncode}:\n{out}")
                res = net.cli(name, "status", check=False)
                return res if isinstance(res, dict) and res.get("ports") else None

            for name in names:
                status = net.wait_until(lambda name=name: status_when_up(name), 30,
                                        what=f"node {name} is up")
                p = bases[name]
                assert status["ports"] == {"tcp": p, "udp": p + 1, "quic": p + 2, "dht": p + 3}
                # the dashboard is not in the (advertised) ports: it listens on P+4, locally
                assert net.cli(name, "gui")["port"] == p + 4

            net.wait_all_see_each_other(names, timeout=30)
            net.trust_all(names)
            for transport in ("tcp", "udp", "quic"):
                res = net.cli("a", "ping", "b", "--transport", transport, "--count", "1")
                assert res["transport"] == transport
                assert normalize_peer_id(res["peer_id"]) == normalize_peer_id(net.peer_id("b"))
                assert res["remote"][1] == bases["b"] + ("tcp", "udp", "quic").index(transport)
            # the DHT on P+3 answers too: a finds b's record there
            found = net.cli("a", "lookup", "b")
            assert normalize_peer_id(found["record"]["peer_id"]) == normalize_peer_id(
                net.peer_id("b"))
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=STOP_TIMEOUT_S)
        for name in names:
            assert procs[name].returncode == 0, (tmp_path / f"{name}.out").read_text()
            assert "Traceback" not in (tmp_path / f"{name}.out").read_text()
