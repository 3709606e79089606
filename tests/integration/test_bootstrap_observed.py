"""The bootstrap server's `observed` field (STUN-like) and records that carry observed addresses."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bootstrap.client import BootstrapClient
from bootstrap.server import start_server
from node.contact import ContactRecord
from node.identity import Identity


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    runner, port = await start_server("127.0.0.1", 0, tmp_path / "b.sqlite3", 300.0)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_register_answer_names_the_source_address(url: str) -> None:
    me = Identity.generate("me")
    record = ContactRecord.create(me, ["127.0.0.1"], {"tcp": 9000}, 1)
    # a raw request from a socket whose port we know
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    src_port = sock.getsockname()[1]
    conn = aiohttp.TCPConnector(local_addr=("127.0.0.1", src_port))
    sock.close()
    async with aiohttp.ClientSession(connector=conn) as session:
        body = {"device_id": str(me.peer_id), "record": record.to_json()}
        async with session.post(url + "/register", json=body) as resp:
            answer: dict[str, Any] = json.loads(await resp.text())
    assert answer["observed"] == {"host": "127.0.0.1", "port": src_port}
    async with BootstrapClient(url) as client:
        assert client.observed is None
        await client.register(record)
        assert client.observed is not None and client.observed[0] == "127.0.0.1"


async def test_a_legacy_answer_keeps_the_seed_contract(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/register", json={"device_id": "dev1"}) as resp:
            assert "observed" not in json.loads(await resp.text())


async def test_records_with_observed_addresses_travel_through_the_server(url: str) -> None:
    a, b = Identity.generate("a"), Identity.generate("b")
    rec_a = ContactRecord.create(a, ["198.18.0.7"], {"tcp": 9000, "dht": 9003}, 1,
                                 observed=[("dht", "198.19.0.9", 40000)])
    async with BootstrapClient(url) as client:
        await client.register(rec_a)
        others = await client.register(ContactRecord.create(b, ["127.0.0.1"], {"tcp": 1}, 1))
        assert others == [rec_a]
        listed = [e["record"] for e in await client.list_peers()]
        assert rec_a in listed


@pytest.mark.parametrize("observed", [None, "x", {"host": "nope", "port": 1},
                                      {"host": "127.0.0.1", "port": 0},
                                      {"host": "127.0.0.1", "port": "80"}])
async def test_client_ignores_a_bad_observed_field(observed: object) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"message": "ok", "peers": [], "records": [],
                                  "observed": observed})

    app = web.Application()
    app.router.add_post("/register", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        me = Identity.generate("me")
        async with BootstrapClient(f"http://127.0.0.1:{port}") as client:
            assert await client.register(ContactRecord.create(me, ["127.0.0.1"], {"tcp": 1}, 1)) \
                == []
            assert client.observed is None
    finally:
        await runner.cleanup()
