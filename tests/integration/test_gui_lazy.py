"""The dashboard's server (aiohttp, ~14 MB) loads at its first visitor, not at start.

Runs in a fresh interpreter (pytest itself has aiohttp loaded): a LazyGui on a free port
of 127.0.0.1 with a stand-in dispatcher; the script reports what it saw at each step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import asyncio, json, socket, sys, urllib.request
    from pathlib import Path
    from node.gui.lazy import LazyGui

    home = Path(sys.argv[1])
    steps = {}

    async def dispatch(cmd, args, emit):
        return {"cmd": cmd, "peers": [], "transfers": []}

    def get(url, token):
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())

    async def main():
        gui = LazyGui(dispatch, home=home, host="127.0.0.1", port=0, commands=lambda: ["status"])
        port = await gui.start()
        steps["aiohttp_after_start"] = "aiohttp" in sys.modules
        steps["token_file"] = (home / "gui.token").read_text().strip() == gui.token
        steps["url"] = gui.info()["url"] == f"http://127.0.0.1:{port}/?token={gui.token}"
        # two visitors at once: both answered by the server the first one loaded
        answers = await asyncio.gather(*(asyncio.to_thread(
            get, f"http://127.0.0.1:{port}/api/status", gui.token) for _ in range(2)))
        steps["answers"] = [status for status, _ in answers]
        steps["aiohttp_after_visit"] = "aiohttp" in sys.modules
        steps["later"] = (await asyncio.to_thread(
            get, f"http://127.0.0.1:{port}/api/status", gui.token))[0]
        await gui.stop()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            steps["closed"] = False
        except ConnectionRefusedError:
            steps["closed"] = True
        # one that nobody visited stops cleanly too, its port freed
        idle = LazyGui(dispatch, home=home, host="127.0.0.1", port=0)
        idle_port = await idle.start()
        await idle.stop()
        try:
            socket.create_connection(("127.0.0.1", idle_port), timeout=2).close()
            steps["idle_closed"] = False
        except ConnectionRefusedError:
            steps["idle_closed"] = True

    asyncio.run(main())
    print(json.dumps(steps))
""")


def test_the_dashboard_server_loads_at_the_first_visitor_and_serves_it(tmp_path: Path
                                                                       ) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads(res.stdout.strip().splitlines()[-1])
    assert steps == {"aiohttp_after_start": False, "token_file": True, "url": True,
                     "answers": [200, 200], "aiohttp_after_visit": True, "later": 200,
                     "closed": True, "idle_closed": True}, steps
