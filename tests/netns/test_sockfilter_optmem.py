"""The bootstrap server's kernel blocks fit a small net.core.optmem_max (kernels before
6.9 default to 20,480 bytes): BLOCKED_MAX IPv6 /64s and IPv4 addresses, installed and
replaced, in a network namespace of the test's own whose optmem_max is set that low."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OLD_DEFAULT_OPTMEM_MAX = 20480

PROBE = f"""
import socket
from bootstrap import sockfilter
from bootstrap.limits import BLOCKED_MAX
with open("/proc/sys/net/core/optmem_max", "w") as f:
    f.write("{OLD_DEFAULT_OPTMEM_MAX}")
for family, name in ((socket.AF_INET6, lambda i: f"2001:db8:{{i:x}}::/64"),
                     (socket.AF_INET, lambda i: f"10.{{i >> 8}}.{{i & 255}}.1")):
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        for n in range(1, BLOCKED_MAX + 1):  # one more block at a time, as the server does
            sockfilter.block(sock, [name(i) for i in range(n)])
        sockfilter.block(sock, [name(i) for i in range(1, BLOCKED_MAX + 1)])  # a replacement
print("ok")
"""


def test_the_longest_blocklists_fit_the_old_default_option_memory(require_netns: None
                                                                  ) -> None:
    res = subprocess.run(["unshare", "--net", sys.executable, "-c", PROBE], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0 and "optmem_max" in res.stderr and "Errno 2" in res.stderr:
        pytest.skip("this kernel has no per-namespace net.core.optmem_max")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
