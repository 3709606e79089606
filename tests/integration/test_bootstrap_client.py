"""BootstrapClient against the real server, against hostile fake servers, and the CLI process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bootstrap.client import MAX_RESPONSE_BYTES, BootstrapClient
from bootstrap.server import STORE_KEY, start_server
from node.contact import ContactRecord
from node.errors import PeerUnreachable, ProtocolError
from node.identity import Identity

REPO = Path(__file__).resolve().parents[2]


def record_for(ident: Identity, seq: int = 1, port: int = 9000) -> ContactRecord:
    return ContactRecord.create(ident, ["127.0.0.1"], {"tcp": port, "udp": port + 1}, seq)


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    runner, port = await start_server("127.0.0.1", 0, tmp_path / "b.sqlite3", 300.0)
    yield f"http://127.0.0.1:{port}", runner
    await runner.cleanup()


async def fake_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_register_list_unregister_roundtrip(real: tuple[str, Any]) -> None:
    url, _ = real
    a, b, c = Identity.generate("a"), Identity.generate("b"), Identity.generate("c")
    async with BootstrapClient(url) as client:
        # the server lists the registrant too (seed contract); the client drops itself
        assert await client.register(record_for(a)) == []
        assert [r.peer_id for r in await client.register(record_for(b))] == [a.peer_id]
        others = await client.register(record_for(c, port=7000))
        assert {r.peer_id for r in others} == {a.peer_id, b.peer_id}
        peers = await client.list_peers()
        assert {p["device_id"] for p in peers} == {str(x.peer_id) for x in (a, b, c)}
        assert all(isinstance(p["record"], ContactRecord) for p in peers)
        await client.unregister(b)
        await client.unregister(b)  # not registered any more: a no-op, not an error
        assert {p["device_id"] for p in await client.list_peers()} == {
            str(a.peer_id), str(c.peer_id)}


async def test_list_peers_follows_cursors_up_to_limit(real: tuple[str, Any]) -> None:
    url, runner = real
    now = time.time()
    runner.app[STORE_KEY].bulk_load([(f"d{i:05d}", None, now, now + 300) for i in range(2500)])
    async with BootstrapClient(url) as client:
        got = await client.list_peers(limit=1200)
        assert [p["device_id"] for p in got] == [f"d{i:05d}" for i in range(1200)]
        got = await client.list_peers(limit=10_000)
        assert len(got) == 2500 and len({p["device_id"] for p in got}) == 2500
        assert all(p["record"] is None for p in got)


async def test_stale_record_is_protocol_error_naming_url(real: tuple[str, Any]) -> None:
    url, _ = real
    ident = Identity.generate()
    async with BootstrapClient(url) as client:
        await client.register(record_for(ident, seq=5))
        with pytest.raises(ProtocolError, match=re.escape(url) + ".*409"):
            await client.register(record_for(ident, seq=4))


async def test_unreachable_server_is_peer_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with BootstrapClient(url, timeout_s=2.0) as client:
        with pytest.raises(PeerUnreachable, match=re.escape(url)):
            await client.register(record_for(Identity.generate()))
        with pytest.raises(PeerUnreachable, match=re.escape(url)):
            await client.list_peers()


def test_bad_url_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        BootstrapClient("ftp://example.org")
    with pytest.raises(ProtocolError):
        BootstrapClient("not a url")


async def test_hostile_server_records_are_verified_and_dropped() -> None:
    good_id, other = Identity.generate(), Identity.generate()
    me = Identity.generate()
    good = record_for(good_id)
    forged = replace(record_for(other), ports={"tcp": 1})
    mine = record_for(me)

    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.json_response({"message": "ok", "peers": [], "records": [
                good.to_json(), forged.to_json(), {"peer_id": 5}, "junk", mine.to_json()]})
        return web.json_response({"next_cursor": None, "peers": [
            {"device_id": str(good_id.peer_id), "record": good.to_json(), "last_seen": 1.5},
            {"device_id": str(other.peer_id), "record": forged.to_json(), "last_seen": 1.5},
            # a valid record listed under someone else's id
            {"device_id": str(other.peer_id), "record": good.to_json(), "last_seen": 1.5},
            {"device_id": "legacy", "record": None, "last_seen": 2},
            {"device_id": "x" * 500, "record": None, "last_seen": 2},
            {"device_id": "bad-ts", "record": None, "last_seen": "yesterday"},
            42,
        ]})

    runner, url = await fake_server(handler)
    try:
        async with BootstrapClient(url) as client:
            assert await client.register(mine) == [good]
            peers = await client.list_peers()
            assert [(p["device_id"], p["record"]) for p in peers] == [
                (str(good_id.peer_id), good), ("legacy", None)]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("behaviour", ["500", "not-json", "huge", "slow", "no-records", "loop"])
async def test_misbehaving_server_raises_clear_errors(behaviour: str) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if behaviour == "500":
            return web.json_response({"error": "database on fire"}, status=500)
        if behaviour == "not-json":
            return web.Response(text="<html>hi</html>")
        if behaviour == "huge":
            return web.Response(body=b" " * (MAX_RESPONSE_BYTES + 10))
        if behaviour == "slow":
            await asyncio.sleep(2)
            return web.json_response({})
        if behaviour == "loop":  # hands out the same cursor forever
            return web.json_response({"peers": [], "records": [], "next_cursor": "abc"}
                                     if request.method == "POST" else
                                     {"peers": [{"device_id": "a", "record": None,
                                                 "last_seen": 1}], "next_cursor": "abc"})
        return web.json_response({"message": "ok", "peers": []})

    runner, url = await fake_server(handler)
    expected: dict[str, type[Exception]] = {
        "500": PeerUnreachable, "not-json": ProtocolError, "huge": ProtocolError,
        "slow": PeerUnreachable, "no-records": ProtocolError, "loop": ProtocolError}
    try:
        async with BootstrapClient(url, timeout_s=0.5) as client:
            with pytest.raises(expected[behaviour], match=re.escape(url)):
                if behaviour == "loop":
                    await client.list_peers()
                else:
                    await client.register(record_for(Identity.generate()))
    finally:
        await runner.cleanup()


# -- the server as its own process ------------------------------------------------


@pytest.mark.slow
def test_python_m_bootstrap_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bootstrap", "--port", "0", "--db", str(tmp_path / "b.sqlite3"),
         "--ttl", "60"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 20
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert match, line
        url = match.group(1)

        async def talk() -> list[dict[str, Any]]:
            async with BootstrapClient(url) as client:
                await client.register(record_for(Identity.generate()))
                return await client.list_peers()

        assert len(asyncio.run(talk())) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.slow
def test_python_m_bootstrap_rejects_bad_flags(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "bootstrap", "--ttl", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode != 0 and "--ttl" in res.stderr
    res = subprocess.run([sys.executable, "-m", "bootstrap", "--register-rate", "-1"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 2 and "register_rate_per_s must be" in res.stderr
