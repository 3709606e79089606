"""Presence with real node processes (issue 11 item 7): `node peers` shows a peer offline
once it is no longer heard from. A graceful stop says goodbye (a signed heartbeat
with the goodbye flag), so it shows offline at once; a kill -9 says nothing, so it shows
offline when its heartbeats stop arriving: within the presence timeout, 3 x
``heartbeat_s`` (set short here through P2PFS_HEARTBEAT_S). Before, both stayed
``online`` for 5 minutes (and as long as the bootstrap server still listed them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id  # noqa: E402

pytestmark = pytest.mark.slow

HEARTBEAT_S = 3.0
PRESENCE_TIMEOUT_S = 3 * HEARTBEAT_S
# without a goodbye a stopped peer shows offline PRESENCE_TIMEOUT_S after its last
# heartbeat, so at least this long after it stopped; a goodbye must beat that
NO_GOODBYE_MIN_S = PRESENCE_TIMEOUT_S - HEARTBEAT_S
# each `node peers` poll is a fresh CLI process (~0.5-2 s on a busy 2-core machine)
POLL_SLACK_S = 4.0


def _online(net: Testnet, viewer: str, peer: str) -> bool | None:
    want = normalize_peer_id(net.peer_id(peer))
    for row in net.cli(viewer, "peers"):
        if normalize_peer_id(row["peer_id"]) == want:
            return bool(row["online"])
    return None


def test_a_stopped_peer_shows_offline_goodbye_at_once_kill_within_the_timeout(
        tmp_path: Path) -> None:
    with Testnet(tmp_path / "net", node_settings={"heartbeat_s": str(HEARTBEAT_S)}) as net:
        net.start_bootstrap()
        net.add_nodes(["a", "b", "c"])
        for other in ("b", "c"):
            net.cli("a", "trust", net.peer_id(other), "--name", other, json=False)
            net.cli(other, "trust", net.peer_id("a"), "--name", "a", json=False)
        net.wait_until(lambda: _online(net, "a", "b") and _online(net, "a", "c"), timeout=30,
                       what="a sees b and c online (their heartbeats arrive)")

        net.stop("b")  # SIGTERM: a clean stop, which says goodbye
        t_stop = time.monotonic()
        net.wait_until(lambda: _online(net, "a", "b") is False, timeout=NO_GOODBYE_MIN_S - 1,
                       interval=0.1, what="a shows b offline after b's goodbye")
        goodbye_s = time.monotonic() - t_stop
        # b is still listed (known from the bootstrap server), just not online
        assert _online(net, "a", "b") is False
        assert _online(net, "a", "c") is True

        net.kill("c")  # kill -9: no goodbye, the heartbeats just stop
        t_kill = time.monotonic()
        net.wait_until(lambda: _online(net, "a", "c") is False,
                       timeout=PRESENCE_TIMEOUT_S + POLL_SLACK_S, interval=0.1,
                       what="a shows c offline within the presence timeout")
        killed_s = time.monotonic() - t_kill
        print(f"offline in `node peers`: {goodbye_s:.2f} s after a clean stop, "
              f"{killed_s:.2f} s after kill -9 (presence timeout {PRESENCE_TIMEOUT_S:g} s)")
