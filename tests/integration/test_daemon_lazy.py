"""A daemon with no folder and no pairing in progress never imports the folder engine or
the pairing code (data-path issue, item 7: peak RSS < 64 MB); the first use loads them.

Each test runs real Daemons (every port 0 on 127.0.0.1, no dashboard, no LAN discovery)
in a fresh interpreter, since pytest itself has imported everything: the script prints
which of the lazily loaded modules it found in ``sys.modules`` at each step.

* a folder added to the running node starts the engine at once (`live` true);
* a "folders" channel from a trusted peer starts it (the peer's offer arrives);
* folders.json gaining a folder by hand starts it within the engine's poll interval;
* invite, accept, send and receive load the pairing services at their first call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

LAZY_MODULES = ("node.folders.engine", "node.folders.disk", "node.folders.ignore", "pathspec",
                "node.pairing.service", "node.pairing.send", "spake2", "node.watcher", "watchdog",
                "platformdirs")
ENGINE_MODULES = ("node.folders.engine", "node.folders.ignore", "pathspec", "watchdog")
PAIRING_MODULES = ("node.pairing.service", "node.pairing.send", "spake2")
SCRIPT_TIMEOUT_S = 60

PRELUDE = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from node.config import Settings
    from node.daemon import Daemon
    from node.identity import Identity

    LAZY = LAZY_MODULES_HERE
    root = Path(sys.argv[1])
    steps = {}

    def loaded():
        return sorted(m for m in LAZY if m in sys.modules)

    def daemon(name):
        settings = Settings(home=root / name, tcp_port=0, udp_port=0, quic_port=0, dht_port=0,
                            gui_port=0, lan_discovery=False, received_dir=str(root / "recv"))
        return Daemon(settings, Identity.generate(name=name))

    async def emit(event):
        return None

    async def wait_for(predicate, timeout_s=20.0):
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True
""").replace("LAZY_MODULES_HERE", repr(LAZY_MODULES))


def _run(tmp_path: Path, body: str) -> dict[str, Any]:
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(steps))\n"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=SCRIPT_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    steps: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return steps


def test_a_folder_added_to_a_running_node_starts_the_engine_then(tmp_path: Path) -> None:
    steps = _run(tmp_path, """
        async def main():
            node = daemon("a")
            await node.start()
            try:
                steps["started"] = loaded()
                steps["engine_before"] = node.folders is not None
                listed = await node.control.dispatch("folder_list", {}, emit)
                steps["listed"] = len(listed)
                steps["after_list"] = loaded()
                docs = root / "docs"
                docs.mkdir()
                row = await node.control.dispatch("folder_add", {"path": str(docs), "id": "docs"},
                                                  emit)
                steps["live"] = row["live"]
                steps["source"] = row["status"]["source"]
                steps["engine_after"] = node.folders is not None
                steps["after_add"] = loaded()
                status = await node.control.dispatch("folder_status", {"id": "docs"}, emit)
                steps["status_source"] = status["status"]["source"]
            finally:
                await node.stop()
        asyncio.run(main())
    """)
    assert steps["started"] == [], f"a node with no folder imported {steps['started']}"
    assert steps["engine_before"] is False
    assert steps["listed"] == 0 and steps["after_list"] == []  # listing needs no engine
    assert steps["live"] is True and steps["engine_after"] is True
    assert steps["source"] == steps["status_source"] == "engine"
    assert set(ENGINE_MODULES) <= set(steps["after_add"])
    assert not set(PAIRING_MODULES) & set(steps["after_add"])


def test_a_folders_channel_from_a_trusted_peer_starts_the_engine(tmp_path: Path) -> None:
    """B has no folder; A adds one shared with B: A's engine dials B, whose daemon starts
    its engine for the channel, and the offer reaches B as a notification."""
    steps = _run(tmp_path, """
        async def main():
            a, b = daemon("a"), daemon("b")
            await b.start()
            await a.start()
            try:
                steps["started"] = loaded()
                a.trust.trust(b.identity.peer_id, "b")
                b.trust.trust(a.identity.peer_id, "a")
                a.book.add(b.record, "manual")
                photos = root / "photos"
                photos.mkdir()
                (photos / "p.jpg").write_bytes(b"jpeg")
                await a.control.dispatch("folder_add", {"path": str(photos), "id": "photos",
                                                        "peers": [str(b.identity.peer_id)]}, emit)

                def offered():
                    return any(n.kind == "folder_offered" for n in b.events.notifications(0))
                steps["b_engine"] = await wait_for(lambda: b.folders is not None)
                steps["offered"] = await wait_for(offered)
            finally:
                await a.stop()
                await b.stop()
        asyncio.run(main())
    """)
    assert steps["started"] == [], f"nodes with no folder imported {steps['started']}"
    assert steps["b_engine"] is True, "B's engine did not start for A's folders channel"
    assert steps["offered"] is True, "A's offer did not reach B"


def test_folders_json_gaining_a_folder_by_hand_starts_the_engine(tmp_path: Path) -> None:
    steps = _run(tmp_path, """
        from node.folders.config import FolderConfig, FolderStore

        async def main():
            node = daemon("a")
            await node.start()
            try:
                steps["started"] = loaded()
                docs = root / "docs"
                docs.mkdir()
                store = FolderStore.load(node.home)  # as another process would edit it
                store.put(FolderConfig(id="docs", path=docs))
                store.save()
                steps["engine"] = await wait_for(lambda: node.folders is not None, 10.0)
                if steps["engine"]:
                    steps["ids"] = sorted(node.folders.runners)
            finally:
                await node.stop()
        asyncio.run(main())
    """)
    assert steps["started"] == []
    assert steps["engine"] is True, "folders.json gained a folder and no engine started"
    assert steps["ids"] == ["docs"]


def test_pairing_commands_load_the_pairing_code_at_first_use(tmp_path: Path) -> None:
    """`node invite` with no rendezvous configured fails cleanly, after loading the pairing
    service; `node receive` of a malformed code likewise for the one-shot service."""
    steps = _run(tmp_path, """
        from node.errors import P2PError

        async def main():
            node = daemon("a")
            await node.start()
            try:
                steps["started"] = loaded()
                for cmd, args in (("invite", {}), ("receive_offer", {"code": "not a code"})):
                    try:
                        await node.control.dispatch(cmd, args, emit)
                        steps[cmd] = "no error"
                    except P2PError as exc:
                        steps[cmd] = type(exc).__name__
                steps["after"] = loaded()
            finally:
                await node.stop()
        asyncio.run(main())
    """)
    assert steps["started"] == [], f"an idle node imported {steps['started']}"
    assert steps["invite"] != "no error" and steps["receive_offer"] != "no error"
    assert set(PAIRING_MODULES) <= set(steps["after"])
    assert "node.folders.engine" not in steps["after"]
