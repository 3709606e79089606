"""The dashboard's folder endpoints (/api/sync-folders) on a real socket, in front of the
real folder_* commands over a FolderStore in a temp home (no engine: the state comes
from the settings). Same guard as every endpoint: token, CSRF on a cookie session."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from node.control import ControlServer
from node.folders.commands import FolderCommands, FolderContext
from node.folders.config import FolderStore
from node.gui.server import GuiServer
from node.identity import Identity
from node.trust import resolve_peer


@dataclass
class Gui:
    server: GuiServer
    home: Path
    base: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.token}"}


@pytest.fixture
async def gui(tmp_path: Path) -> AsyncIterator[Gui]:
    home = tmp_path / "home"
    home.mkdir()
    bob = Identity.generate("bob").peer_id
    store = FolderStore.load(home)
    ctx = FolderContext(home=home, received=home / "received", self_id=None,
                        resolve=lambda t: resolve_peer(t, [(bob, ["bob"])]),
                        is_trusted=lambda p: p == bob, label_for=lambda p: "bob")
    control = ControlServer(tmp_path / "unused.sock")
    FolderCommands(ctx, lambda: store, lambda: None).register(control.register)

    async def status(args: dict, emit: object) -> dict:  # what /api/session reads
        return {"peer_id": "P" * 56, "name": "a", "fingerprint": "f", "ports": {}}

    control.register("status", status)
    server = GuiServer(control.dispatch, home=home, port=0, commands=control.commands)
    await server.start()
    try:
        yield Gui(server, home, f"http://127.0.0.1:{server.port}")
    finally:
        await server.stop()


def _saved(gui: Gui) -> list[dict]:
    path = gui.home / "folders.json"
    return json.loads(path.read_text())["folders"] if path.exists() else []


async def test_add_list_pause_resume_status_remove(gui: Gui, tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    base = f"{gui.base}/api/sync-folders"
    async with aiohttp.ClientSession(headers=gui.bearer) as http:
        async with http.post(base, json={"path": str(d), "id": "photos", "peers": ["bob"],
                                         "mode": "send-only", "label": "P"}) as r:
            assert r.status == 201
            row = await r.json()
            assert (row["id"], row["mode"], row["peer_labels"], row["live"]) == (
                "photos", "send-only", ["bob"], False)
        async with http.get(base) as r:
            rows = await r.json()
            assert [(f["id"], f["status"]["state"], f["status"]["source"]) for f in rows] == [
                ("photos", "idle", "config")]
        async with http.post(f"{base}/photos/pause") as r:
            assert r.status == 200 and (await r.json())["paused"] is True
        assert _saved(gui)[0]["paused"] is True
        async with http.get(f"{base}/photos") as r:
            assert (await r.json())["status"]["state"] == "paused"
        async with http.post(f"{base}/photos/resume") as r:
            assert (await r.json())["paused"] is False
        async with http.post(f"{base}/photos/rescan") as r:  # no engine: said, not faked
            assert r.status == 400
            assert "runs no folder engine" in (await r.json())["error"]["message"]
        async with http.post(f"{base}/photos/explode") as r:
            assert r.status == 404
        async with http.delete(f"{base}/photos") as r:
            assert r.status == 200 and (await r.json())["files_kept"] is True
    assert _saved(gui) == [] and d.is_dir()


async def test_bad_bodies_and_refusals_are_json_errors(gui: Gui, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    base = f"{gui.base}/api/sync-folders"
    cases = [
        ({"path": str(d), "id": "d", "mode": "mirror"}, 400, "use one of"),
        ({"path": str(d), "id": "d", "peers": "bob"}, 400, "peers must be a list"),
        ({"path": str(d), "id": "d", "peers": [str(Identity.generate("x").peer_id)]}, 409,
         "not trusted"),
        ({"path": 5, "id": "d"}, 400, "path must be a string"),
        ({"path": "rel", "id": "d"}, 400, "not an absolute path"),
    ]
    async with aiohttp.ClientSession(headers=gui.bearer) as http:
        for body, status, words in cases:
            async with http.post(base, json=body) as r:
                assert r.status == status, body
                assert words in (await r.json())["error"]["message"], body
        async with http.post(f"{base}/nope/pause") as r:
            assert r.status == 400
            assert "no folder with id 'nope'" in (await r.json())["error"]["message"]
    assert _saved(gui) == []


async def test_a_cookie_session_needs_the_csrf_token(gui: Gui, tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{gui.base}/?token={gui.server.token}",
                            allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(f"{gui.base}/api/session") as r:
            csrf = (await r.json())["csrf_token"]
        body = {"path": str(d), "id": "c"}
        async with http.post(f"{gui.base}/api/sync-folders", json=body) as r:
            assert r.status == 403
        assert _saved(gui) == []
        async with http.post(f"{gui.base}/api/sync-folders", json=body,
                             headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 201
    async with aiohttp.ClientSession() as http:  # and no token at all: 401
        async with http.get(f"{gui.base}/api/sync-folders") as r:
            assert r.status == 401
