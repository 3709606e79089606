"""Scenario: a node crashes (SIGKILL, no clean shutdown) and rejoins.

Start a bootstrap server and 3 nodes, wait until each lists the other two, kill -9
node n2, start it again on the same home dir and ports (its stale daemon.json
must not confuse anyone), and check that it lists the others again and that the
others list it. When the CLI offers `node lookup`, n2 must also find n1's signed
contact record through the DHT.

    .venv/bin/python scripts/testnet.py run scripts/scenarios/crash_rejoin.py

An async `scenario(net)` runs in asyncio.run(); the harness calls are blocking,
so independent waits go to threads with asyncio.to_thread and run concurrently.
"""

from __future__ import annotations

import asyncio
from typing import Any

NODES = ["n1", "n2", "n3"]
JOIN_TIMEOUT_S = 45.0


async def _all_see_each_other(net: Any) -> None:
    await asyncio.gather(*(
        asyncio.to_thread(
            net.wait_until, lambda n=n: net.sees(n, [o for o in NODES if o != n]),
            JOIN_TIMEOUT_S, 0.3, f"{n} lists the other nodes in `node peers --json`")
        for n in NODES))


async def scenario(net: Any) -> None:
    with net.step("start bootstrap server and n1..n3"):
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(NODES)
    with net.step("each node lists the other two"):
        await _all_see_each_other(net)
    with net.step("kill -9 n2"):
        old_pid = net.node("n2").pid
        net.kill("n2")
        assert not net.node("n2").running(), "n2 survived SIGKILL"
    with net.step("start n2 again (same home, same ports)"):
        net.start("n2")
        assert net.node("n2").pid != old_pid
        status = net.cli("n2", "status")
        assert status["peer_id"].replace("-", "") == net.peer_id("n2").replace("-", ""), status
    with net.step("after the crash every node lists the other two again"):
        await _all_see_each_other(net)
    if net.offers("lookup"):
        with net.step("n2 finds n1's contact record with `node lookup`"):
            found = net.wait_until(
                lambda: net.cli("n2", "lookup", net.peer_id("n1")), JOIN_TIMEOUT_S, 0.5,
                "`node lookup n1` on n2 returns a record")
            record = found["record"]
            assert record["peer_id"].replace("-", "") == net.peer_id("n1").replace("-", ""), record
