"""The dashboard's guard on a real socket: token, Host, CSRF, Origin, headers, token file.

The server runs on 127.0.0.1:0 with a fake dispatcher standing in for the daemon's
control commands; every request is a real HTTP request through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.config import Settings
from node.errors import UnknownPeer
from node.gui.server import GuiServer
from node.gui.token import TOKEN_FILE, load_or_create_token


@dataclass
class FakeNode:
    """Records the control commands the dashboard ran; answers like the daemon would."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notes: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    async def dispatch(self, cmd: str, args: dict[str, Any], emit: Any) -> Any:
        self.calls.append((cmd, args))
        if cmd == "status":
            return {"peer_id": "P" * 56, "name": "a", "fingerprint": "f", "ports": {}}
        if cmd == "peers":
            return [{"peer_id": "Q" * 56, "short_id": "QQQQQQQ", "trusted": False}]
        if cmd == "trust":
            if args["peer"] == "nobody":
                raise UnknownPeer("no known peer matches 'nobody'")
            return {"peer_id": args["peer"], "alias": args["name"]}
        if cmd == "share":
            await emit({"type": "started", "id": "t1", "state": "running"})
            await asyncio.Event().wait()  # a long transfer: the POST must not wait for it
        if cmd == "events":
            since = args.get("since") or 0
            await emit({"id": since + 1, "kind": "file_shared", "data": {"path": "x"}})
            if args.get("follow"):
                while True:
                    await emit(await self.notes.get())
            return {"last_id": since + 1}
        return []


@dataclass
class Gui:
    server: GuiServer
    node: FakeNode
    base: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture
async def gui(tmp_path: Path) -> AsyncIterator[Gui]:
    node = FakeNode()
    server = GuiServer(node.dispatch, home=tmp_path, port=0, commands=lambda: ["peers"])
    await server.start()
    try:
        yield Gui(server, node, f"http://127.0.0.1:{server.port}")
    finally:
        await server.stop()


def _client() -> aiohttp.ClientSession:
    # cookies for an IP address are kept only by an "unsafe" jar (a browser keeps them)
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _login(http: aiohttp.ClientSession, gui: Gui) -> str:
    """Open /?token=..., as the URL from `node gui` does; returns the CSRF token."""
    async with http.get(f"{gui.base}/?token={gui.server.token}",
                        allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    async with http.get(f"{gui.base}/api/session") as r:
        assert r.status == 200
        return str((await r.json())["csrf_token"])


async def test_no_token_is_401_and_a_wrong_one_too(gui: Gui) -> None:
    async with _client() as http:
        for path in ("/", "/api/peers", "/api/events", "/static/app.js"):
            async with http.get(gui.base + path) as r:
                assert r.status == 401, path
        async with http.get(f"{gui.base}/?token=not-the-token", allow_redirects=False) as r:
            assert r.status == 401
        async with http.get(f"{gui.base}/api/peers",
                            headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
    assert ("peers", {}) not in gui.node.calls  # nothing ran


async def test_wrong_host_is_403_even_with_the_token(gui: Gui) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host."""
    bearer = {"Authorization": f"Bearer {gui.server.token}"}
    async with _client() as http:
        for host in (f"evil.example:{gui.server.port}", "127.0.0.1:1", "127.0.0.1"):
            async with http.get(f"{gui.base}/api/peers", headers={**bearer, "Host": host}) as r:
                assert r.status == 403, host
            async with http.get(f"{gui.base}/?token={gui.server.token}",
                                headers={"Host": host}, allow_redirects=False) as r:
                assert r.status == 403, host
        async with http.get(f"{gui.base}/api/peers",
                            headers={**bearer, "Host": f"localhost:{gui.server.port}"}) as r:
            assert r.status == 200


async def test_post_needs_the_session_csrf_token_and_a_matching_origin(gui: Gui) -> None:
    async with _client() as http:
        csrf = await _login(http, gui)
        body = {"peer": "Q" * 56, "name": "q"}
        async with http.post(f"{gui.base}/api/trust", json=body) as r:
            assert r.status == 403
        async with http.post(f"{gui.base}/api/trust", json=body,
                             headers={"X-CSRF-Token": "guess"}) as r:
            assert r.status == 403
        async with http.post(f"{gui.base}/api/trust", json=body, headers={
                "X-CSRF-Token": csrf, "Origin": "http://evil.example"}) as r:
            assert r.status == 403
        assert not any(cmd == "trust" for cmd, _ in gui.node.calls)
        async with http.post(f"{gui.base}/api/trust", json=body, headers={
                "X-CSRF-Token": csrf, "Origin": gui.base}) as r:
            assert r.status == 200
            assert (await r.json())["alias"] == "q"
        # the daemon's own errors come back as JSON with a fitting status
        async with http.post(f"{gui.base}/api/trust", json={"peer": "nobody"},
                             headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["type"] == "UnknownPeer"
    assert ("trust", {"peer": "Q" * 56, "name": "q"}) in gui.node.calls


async def test_with_everything_200_and_the_page_headers(gui: Gui) -> None:
    async with _client() as http:
        await _login(http, gui)
        async with http.get(f"{gui.base}/") as r:
            assert r.status == 200
            page = await r.text()
            csp = r.headers["Content-Security-Policy"]
            assert csp.startswith("default-src 'self'")
            assert r.headers["X-Frame-Options"] == "DENY"
        # no external URL anywhere in what the page loads
        assert "http" not in page.replace('href="/static', "")
        for name in ("app.js", "app.css"):
            async with http.get(f"{gui.base}/static/{name}") as r:
                assert r.status == 200
                assert "://" not in await r.text()
        async with http.get(f"{gui.base}/static/..%2Fserver.py") as r:
            assert r.status == 404
        async with http.get(f"{gui.base}/api/peers") as r:
            assert r.status == 200 and (await r.json())[0]["short_id"] == "QQQQQQQ"


async def test_bearer_works_for_curl_without_csrf(gui: Gui) -> None:
    bearer = {"Authorization": f"Bearer {gui.server.token}"}
    async with _client() as http:
        async with http.post(f"{gui.base}/api/trust", json={"peer": "R" * 56},
                             headers=bearer) as r:
            assert r.status == 200
        async with http.get(f"{gui.base}/api/session", headers=bearer) as r:
            assert (await r.json())["csrf_token"] is None
        async with http.post(f"{gui.base}/api/transfers/t1/cancel", headers=bearer) as r:
            assert r.status == 200
        async with http.delete(f"{gui.base}/api/trust/bob", headers=bearer) as r:
            assert r.status == 200
    assert ("cancel", {"id": "t1"}) in gui.node.calls
    assert ("untrust", {"peer": "bob"}) in gui.node.calls


async def test_share_answers_once_started_and_refuses_bad_paths(gui: Gui,
                                                                 tmp_path: Path) -> None:
    bearer = {"Authorization": f"Bearer {gui.server.token}"}
    f = tmp_path / "report.txt"
    f.write_text("x")
    async with _client() as http:
        for paths, words in ((["report.txt"], "absolute"), ([str(tmp_path / "nope")],
                             "does not exist"), ([], "paths"), ("x", "paths")):
            async with http.post(f"{gui.base}/api/share", json={"paths": paths},
                                 headers=bearer) as r:
                assert r.status == 400
                assert words in (await r.json())["error"]["message"]
        assert not any(cmd == "share" for cmd, _ in gui.node.calls)
        async with http.post(f"{gui.base}/api/share", json={"paths": [str(f)]},
                             headers=bearer) as r:
            assert r.status == 202
            assert (await r.json())["transfers"][0]["id"] == "t1"


async def test_events_stream_as_sse_with_ids(gui: Gui) -> None:
    bearer = {"Authorization": f"Bearer {gui.server.token}"}
    async with _client() as http:
        async with http.get(f"{gui.base}/api/events?since=4", headers=bearer) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            await gui.node.notes.put({"id": 6, "kind": "peer_joined", "data": {}})
            seen: list[dict[str, Any]] = []
            async with asyncio.timeout(5):
                async for line in r.content:
                    if line.startswith(b"data: "):
                        seen.append(json.loads(line[6:]))
                        if len(seen) == 2:
                            break
        assert [e["id"] for e in seen] == [5, 6]
        async with http.get(f"{gui.base}/api/events?since=9&stream=0", headers=bearer) as r:
            assert (await r.json()) == {"events": [{"id": 10, "kind": "file_shared",
                                                    "data": {"path": "x"}}], "last_id": 10}
        async with http.get(f"{gui.base}/api/events?since=x", headers=bearer) as r:
            assert r.status == 400


def test_token_file_is_0600_and_kept(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    path = tmp_path / TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40
    assert load_or_create_token(tmp_path) == token  # the same URL after a restart
    path.chmod(0o644)
    assert load_or_create_token(tmp_path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_listens_only_on_127_0_0_1_by_default(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).gui_host == "127.0.0.1"
    server = GuiServer(FakeNode().dispatch, home=tmp_path, port=0)
    await server.start()
    try:
        assert server.host == "127.0.0.1"
        assert server.addresses() == [("127.0.0.1", server.port)]
    finally:
        await server.stop()
