"""The dashboard's JSON API answers every refusal as JSON: an unknown endpoint, a method
it does not take, a body too large, and a bad query names the query key (not a CLI flag).
Real aiohttp server on 127.0.0.1 with a fake node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.gui.server import MAX_BODY_BYTES, GuiServer


async def _dispatch(cmd: str, args: dict[str, Any], emit: Any) -> Any:
    return []


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    server = GuiServer(_dispatch, home=tmp_path, port=0, commands=lambda: ["log"])
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", {"Authorization": f"Bearer {server.token}"}
    finally:
        await server.stop()


async def test_unknown_endpoint_method_and_big_body_are_json(
        api: tuple[str, dict[str, str]]) -> None:
    base, bearer = api
    async with aiohttp.ClientSession(headers=bearer) as http:
        async with http.get(f"{base}/api/nothing") as r:
            assert r.status == 404
            assert r.headers["X-Frame-Options"] == "DENY"
            assert (await r.json())["error"] == {
                "type": "NotFound",
                "message": "no such API endpoint: GET /api/nothing (docs/api.md lists them)"}
        async with http.delete(f"{base}/api/status") as r:
            assert r.status == 405
            assert (await r.json())["error"]["type"] == "MethodNotAllowed"
            assert "GET" in r.headers.get("Allow", "")  # a 405 says which methods
        async with http.post(f"{base}/api/trust", data=b"x" * (MAX_BODY_BYTES + 1),
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413
            assert "at most 65,536 bytes" in (await r.json())["error"]["message"]
        async with http.get(f"{base}/static/nothing.js") as r:  # the page's files: as before
            assert r.status == 404 and r.content_type != "application/json"


async def test_a_bad_log_since_names_the_query_key(api: tuple[str, dict[str, str]]) -> None:
    base, bearer = api
    async with aiohttp.ClientSession(headers=bearer) as http:
        async with http.get(f"{base}/api/log", params={"since": "yesterday"}) as r:
            assert r.status == 400
            message = (await r.json())["error"]["message"]
    assert message == "since: 'yesterday' is not a time (epoch ms, or e.g. 10m, 2h, 3d)"
