"""A NAT lab: real network namespaces, a bridge, veth pairs and iptables MASQUERADE.

Topology (every address from 198.18.0.0/15, the benchmarking range, and only
inside these namespaces)::

                      <p>-inet: bridge br0 198.18.0.1/24 (relay, bootstrap server)
                       /                                   \\
        <p>-r1: wan 198.18.0.11                  <p>-r2: wan 198.18.0.12
             MASQUERADE [--random-fully]               MASQUERADE [--random-fully]
             drops unsolicited inbound                 drops unsolicited inbound
             (forwarded and to itself)                 (forwarded and to itself)
             lan 198.18.1.1/24                         lan 198.18.2.1/24
                       |                                   |
        <p>-h1: 198.18.1.2 (node a)              <p>-h2: 198.18.2.2 (node b)

The routers have no route to each other's LAN, so a host dialling the other
host's (private) address fails at once: only a relay in the "internet" joins
them. ``NatLab`` builds it, starts processes inside it (``ip netns exec``),
and ``teardown()`` always removes every namespace and kills every process it
started, whatever happened before.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INTERNET_ADDR = "198.18.0.1"
ROUTER_WAN = {1: "198.18.0.11", 2: "198.18.0.12"}
ROUTER_LAN = {1: "198.18.1.1", 2: "198.18.2.1"}
HOST_ADDR = {1: "198.18.1.2", 2: "198.18.2.2"}
CMD_TIMEOUT_S = 20.0


class LabError(Exception):
    pass


def lab_unavailable_reason() -> str | None:
    """None when this process can build namespaces, else why not (for a skip message)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the NAT lab needs root (ip netns, iptables); run the suite as root to include it"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (Debian: apt-get install iproute2 iptables)"
    probe = f"p2lprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    try:
        res = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            return f"iptables nat table unusable in a namespace: {res.stderr.strip()[:200]}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class LabProcess:
    ns: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@dataclass
class NatLab:
    root: Path
    random_fully: bool = False
    prefix: str = field(default_factory=lambda: f"p2l{secrets.token_hex(3)}")
    namespaces: list[str] = field(default_factory=list)
    processes: list[LabProcess] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    # -- building -------------------------------------------------------------
    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = ["ip", *(["-n", ns] if ns else []), *args]
        self._run(cmd)

    def _run(self, cmd: Sequence[str]) -> str:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if res.returncode != 0:
            raise LabError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")
        return res.stdout

    def in_ns(self, ns: str, *cmd: str) -> str:
        return self._run(["ip", "netns", "exec", ns, *cmd])

    def build(self) -> NatLab:
        inet = self.ns("inet")
        for role in ("inet", "r1", "r2", "h1", "h2"):
            self._ip("netns", "add", self.ns(role))
            self.namespaces.append(self.ns(role))
            self._ip("link", "set", "lo", "up", ns=self.ns(role))
        self._ip("link", "add", "br0", "type", "bridge", ns=inet)
        self._ip("addr", "add", f"{INTERNET_ADDR}/24", "dev", "br0", ns=inet)
        self._ip("link", "set", "br0", "up", ns=inet)
        for i in (1, 2):
            router, host = self.ns(f"r{i}"), self.ns(f"h{i}")
            # router wan <-> a port of the internet's bridge
            self._ip("link", "add", "wan", "type", "veth", "peer", "name", f"port{i}",
                     "netns", inet, ns=router)
            self._ip("link", "set", f"port{i}", "master", "br0", ns=inet)
            self._ip("link", "set", f"port{i}", "up", ns=inet)
            self._ip("addr", "add", f"{ROUTER_WAN[i]}/24", "dev", "wan", ns=router)
            self._ip("link", "set", "wan", "up", ns=router)
            # router lan <-> host eth0
            self._ip("link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                     "netns", host, ns=router)
            self._ip("addr", "add", f"{ROUTER_LAN[i]}/24", "dev", "lan", ns=router)
            self._ip("link", "set", "lan", "up", ns=router)
            self._ip("addr", "add", f"{HOST_ADDR[i]}/24", "dev", "eth0", ns=host)
            self._ip("link", "set", "eth0", "up", ns=host)
            self._ip("route", "add", "default", "via", ROUTER_LAN[i], ns=host)
            self.in_ns(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j",
                    "MASQUERADE"]
            self.in_ns(router, *masq, *(["--random-fully"] if self.random_fully else []))
            # a home router: replies come back in, nothing unsolicited does, neither to
            # the hosts (FORWARD) nor to the router itself (INPUT). The INPUT drop also
            # matters for hole punching: an unsolicited packet accepted there leaves a
            # conntrack entry that makes MASQUERADE give the host's own outgoing packet
            # to that peer another port, so the port the peer was told is wrong
            for chain in ("FORWARD", "INPUT"):
                self.in_ns(router, "iptables", "-A", chain, "-i", "wan", "-m", "conntrack",
                           "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
                self.in_ns(router, "iptables", "-A", chain, "-i", "wan", "-j", "DROP")
        return self

    def block_udp_between_routers(self, blocked: bool = True) -> None:
        """Drop (or stop dropping) udp from each router's LAN to the other router: no
        hole punch can succeed while it is blocked; the relay (tcp) still works."""
        for i, other in ((1, 2), (2, 1)):
            rule = ["FORWARD", "-p", "udp", "-d", ROUTER_WAN[other], "-j", "DROP"]
            self.in_ns(self.ns(f"r{i}"), "iptables", "-I" if blocked else "-D", *rule)

    def limit_udp(self, packets_per_s: int) -> None:
        """Both routers forward at most `packets_per_s` udp packets a second per
        destination and drop the rest (there is no tc netem here): a slow path."""
        for i in (1, 2):
            self.in_ns(self.ns(f"r{i}"), "iptables", "-I", "FORWARD", "-p", "udp", "-m",
                       "hashlimit", "--hashlimit-above", f"{packets_per_s}/sec",
                       "--hashlimit-burst", str(max(1, packets_per_s // 10)),
                       "--hashlimit-mode", "dstip", "--hashlimit-name", "slow", "-j", "DROP")

    # -- processes --------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PFS_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["P2PFS_REGISTER_INTERVAL_S"] = "1"
        return env

    def spawn(self, ns: str, argv: Sequence[str], name: str) -> LabProcess:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["ip", "netns", "exec", ns, *argv]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, env=self.env(),
                                     cwd=self.root, start_new_session=True)
        proc = LabProcess(ns, list(argv), log_path, popen)
        self.processes.append(proc)
        return proc

    def node_cli(self, home: Path, *args: str, ns: str | None = None,
                 timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`node ARGS --home HOME` (in `ns` when given: commands that dial need it; the
        control socket is a file, reachable from any namespace)."""
        cmd = [sys.executable, "-m", "node", *args, "--home", str(home)]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=self.env(), cwd=self.root, stdin=subprocess.DEVNULL)

    # -- teardown ---------------------------------------------------------------
    def teardown(self) -> None:
        for proc in reversed(self.processes):  # clients before the servers they talk to
            if proc.alive():
                _signal_group(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for proc in self.processes:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5.0)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               on_timeout: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting until {what}\n"
                                 f"{on_timeout()}")
        time.sleep(0.1)
