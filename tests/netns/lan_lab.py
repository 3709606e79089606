"""A LAN lab in network namespaces: N hosts on one bridge, nothing else.

``LanLab(n)`` creates one namespace per host (``p2plan-<pid>-h<i>``) and one for
the switch (``p2plan-<pid>-sw``) holding a bridge; each host gets a veth into the
bridge with 198.18.0.<i+1>/24 (RFC 2544 benchmarking space, never routed) and no
default route. Nothing touches the root namespace: deleting the namespaces
removes every veth and the bridge, which ``close()`` always does (also after a
failed set-up), and an atexit hook does too if the test process dies early.

``skip_reason()`` says why the lab cannot run here (not root, no ``ip``, or
``ip netns`` refused), or None. Used by tests/netns/test_lan_netns.py.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Self

SUBNET_PREFIX = "198.18.0."
PREFIX_LEN = 24
IP_TIMEOUT_S = 10.0


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S, stdin=subprocess.DEVNULL)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (run the netns tests as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"p2plan-{os.getpid()}-probe"
    try:
        res = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip() or res.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


class LanLab:
    def __init__(self, hosts: int) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("1-200 hosts")
        tag = f"p2plan-{os.getpid()}"
        self.switch = f"{tag}-sw"
        self.hosts = [f"{tag}-h{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET_PREFIX}{i + 1}" for i in range(hosts)]
        self._made: list[str] = []
        atexit.register(self.close)

    def __enter__(self) -> Self:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        for ns in (self.switch, *self.hosts):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
        # no multicast snooping: with no IGMP querier on this LAN, flood multicast
        _ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, (ns, addr) in enumerate(zip(self.hosts, self.addresses, strict=True)):
            port = f"p{i}"
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                ns=self.switch)
            _ip("link", "set", port, "master", "br0", ns=self.switch)
            _ip("link", "set", port, "up", ns=self.switch)
            _ip("addr", "add", f"{addr}/{PREFIX_LEN}", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)

    def exec_argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside host `host`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def close(self) -> None:
        made, self._made = self._made, []
        for ns in reversed(made):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (for the teardown check)."""
        res = _ip("netns", "list", check=False)
        names = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
        return [ns for ns in (self.switch, *self.hosts) if ns in names]
