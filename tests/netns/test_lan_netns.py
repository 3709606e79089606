"""Two hosts on one bridge (network namespaces, 198.18.0.0/24), no bootstrap server, no
--bootstrap-peer, default LAN discovery (real directed broadcast + multicast on port
21029): each lists the other with source `lan`, advertises its interface address
(never the 0.0.0.0 it listens on), and a file shared from one arrives at the other.

Root only; skipped with the reason otherwise (tests/netns/lan_lab.py). Real `node`
processes run under `ip netns exec`; every process and namespace is torn down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.netns.lan_lab import LanLab, skip_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 20.0
LAN_FOUND_WITHIN_S = 5.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PFS_")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(0.1)


def _log_time(path: Path, needle: str) -> float:
    for line in path.read_text(errors="replace").splitlines():
        if needle in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no line with {needle!r} in {path}")


class Host:
    def __init__(self, lab: LanLab, index: int, home: Path) -> None:
        self.lab, self.index, self.home = lab, index, home
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # the control socket is a Unix socket in the home dir: reachable from any namespace
        res = subprocess.run([sys.executable, "-m", "node", *args, "--home", str(self.home)],
                             capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=_env(),
                             cwd=REPO, stdin=subprocess.DEVNULL, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"node {' '.join(args)} failed: {res.stdout}{res.stderr}\n"
                                 f"--- log ---\n{self.log_tail()}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self) -> None:
        log = open(self.home / "stdout.log", "wb")  # noqa: SIM115 - closed with the process
        argv = self.lab.exec_argv(self.index, [
            sys.executable, "-m", "node", "start", "--home", str(self.home),
            "--listen-host", "0.0.0.0"])
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                     cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
        return self.cli("status", check=False).returncode == 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self) -> str:
        text = ""
        for name in ("stdout.log", "node.log"):
            with contextlib.suppress(OSError):
                text += (self.home / name).read_text(errors="replace")[-3000:]
        return text


@pytest.fixture
def lab() -> Iterator[LanLab]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"LAN netns lab skipped: {reason}")
    with LanLab(2) as lab:
        yield lab
    assert lab.leftovers() == []


def test_two_hosts_find_each_other_by_broadcast_and_multicast(lab: LanLab,
                                                              tmp_path: Path) -> None:
    hosts = [Host(lab, i, tmp_path / f"h{i}") for i in range(2)]
    try:
        for i, h in enumerate(hosts):
            h.cli("init", "--name", f"h{i}")
        ids = [h.json("id")["peer_id"] for h in hosts]
        hosts[0].start()
        _wait(hosts[0].ready, 30, "h0 is ready")
        hosts[1].start()
        _wait(hosts[1].ready, 30, "h1 is ready")
        t_ready = time.monotonic()

        def lan_peer(me: int) -> dict[str, Any] | None:
            other = ids[1 - me].replace("-", "")
            for row in hosts[me].json("peers"):
                if row["peer_id"].replace("-", "") == other and "lan" in row["source"]:
                    return row  # type: ignore[no-any-return]
            return None

        _wait(lambda: lan_peer(0) and lan_peer(1), 15, "both list each other (source lan)")
        elapsed = time.monotonic() - t_ready
        # the nodes' own log lines time it exactly (`node peers` polls cost ~1 s each here)
        up = _log_time(hosts[1].home / "node.log", " (h1) is up")
        heard = max(_log_time(h.home / "node.log", "LAN: heard ") for h in hosts)
        print(f"h1 up -> both heard each other {heard - up:.3f} s; `node peers` showed it "
              f"{elapsed:.2f} s after h1 was ready")
        assert heard - up < LAN_FOUND_WITHIN_S
        for me in (0, 1):
            row = lan_peer(me)
            assert row is not None and row["source"] == "lan"
            # listening on 0.0.0.0, each advertises its interface address, never 0.0.0.0
            assert row["hosts"] == [lab.addresses[1 - me]]
        status = hosts[0].json("status")
        assert status["hosts"] == [lab.addresses[0]]
        lan = status["lan_discovery"]
        assert lan["targets"] == ["198.18.0.255:21029", "239.192.21.29:21029"]
        # each announcement went out twice (broadcast and multicast) and both arrived:
        # the second copy of a packet only refreshes
        _wait(lambda: hosts[0].json("status")["lan_discovery"]["received"]["refreshed"] >= 1,
              10, "a second copy (the other of broadcast/multicast) reached h0")

        for me in (0, 1):
            hosts[me].cli("trust", ids[1 - me], "--name", f"h{1 - me}")
        src = tmp_path / "lan-file.bin"
        src.write_bytes(os.urandom(300_000))
        hosts[0].cli("share", str(src), "--to", "h1")
        got = hosts[1].home / "received" / "h0" / "lan-file.bin"
        _wait(got.exists, 20, "h1 received the file")
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(
            src.read_bytes()).digest()
    finally:
        for h in hosts:
            h.stop()
