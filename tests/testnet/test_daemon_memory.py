"""A running node carries only what it uses (data-path issue, item 7: peak RSS < 64 MB).

* `node start` execs the daemon's own entry (node/daemon_main.py): the daemon
  process never loads the CLI's typer/rich/pydantic/click;
* an idle node never loads qh3 (QUIC), even while it listens on QUIC
  (node/transports/quic_lazy.py), nor aiohttp, even while it registers with a
  bootstrap server (bootstrap/http_lite.py: ~8.6 MB less per node);
* `node start` creates the QUIC certificate pair before it execs the daemon, so
  the daemon never runs cryptography's X.509 code (node/transports/certs.py).

A module loaded in another process cannot be read from ``sys.modules``, so the
real-process checks read /proc/PID/maps: each of these libraries maps its own
extension module (pydantic_core, qh3._hazmat, aiohttp's parser) once imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet  # noqa: E402

CLI_ONLY = ("typer", "rich", "pydantic", "pydantic_core", "click", "node.cli")
NOT_WHEN_IDLE = ("qh3", "aiohttp")


def _top_modules(code: str) -> set[str]:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def test_daemon_entry_imports_none_of_the_cli_libraries() -> None:
    mods = _top_modules(
        "import json, sys, node.daemon_main, node.daemon, node.peering, node.sharing\n"
        "print(json.dumps(sorted(sys.modules)))")
    assert "node.daemon" in mods
    assert not mods & set(CLI_ONLY), sorted(mods & set(CLI_ONLY))
    assert not mods & set(NOT_WHEN_IDLE), sorted(mods & set(NOT_WHEN_IDLE))


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_idle_node_loads_no_cli_quic_or_http_library(tmp_path: Path) -> None:
    with Testnet(tmp_path) as net:
        net.start_bootstrap(ttl_s=120)
        node = net.add_node("a")
        net.add_node("b")
        net.wait_until(lambda: net.sees("a", ["b"]), 45, what="a lists b (bootstrap used)")
        status = net.cli("a", "status")
        assert status["ports"]["tcp"] and status["ports"]["quic"]  # listening on QUIC too
        assert node.pid is not None
        cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes().split(b"\0")
        assert b"node.daemon_main" in cmdline, cmdline
        maps = _mapped(node.pid)
        assert "/blake3" in maps and "cryptography" in maps  # the check can see libraries
        for lib in ("pydantic_core", "qh3", "aiohttp"):
            assert f"/{lib}/" not in maps, f"an idle node loaded {lib}"
        # `node start` made the QUIC cert pair before the exec: the daemon will only read it
        assert (node.home / "quic-cert.pem").is_file() and (node.home / "quic-key.pem").is_file()
