"""The bootstrap server over real HTTP on 127.0.0.1 with a real SQLite file."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bootstrap import unregister_message
from bootstrap.limits import ServerLimits
from bootstrap.server import MSG_REFRESHED, MSG_REGISTERED, STORE_KEY, start_server
from node.contact import ContactRecord
from node.identity import Identity


class Server:
    """A running bootstrap server plus one HTTP session to it."""

    def __init__(self, db: Path, ttl_s: float, limits: ServerLimits | None = None) -> None:
        self.db, self.ttl_s, self.limits = db, ttl_s, limits
        self.runner: Any = None
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.runner, port = await start_server("127.0.0.1", 0, self.db, self.ttl_s,
                                               limits=self.limits)
        self.url = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def store(self) -> Any:
        return self.runner.app[STORE_KEY]

    async def call(self, method: str, path: str, body: Any = None, *,
                   data: bytes | None = None, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None
        if body is not None:
            data = json.dumps(body).encode()
        async with self.http.request(method, self.url + path, data=data, **kw) as resp:
            text = await resp.text()
            assert resp.content_type == "application/json", (resp.status, text)
            return resp.status, json.loads(text)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(tmp_path / "bootstrap.sqlite3", 300.0)
    await srv.start()
    yield srv
    await srv.stop()


def record_for(ident: Identity, seq: int = 1, port: int = 9000, **kw: Any) -> ContactRecord:
    return ContactRecord.create(ident, ["127.0.0.1"], {"tcp": port}, seq, **kw)


def reg_body(rec: ContactRecord, device_id: str | None = None) -> dict[str, Any]:
    return {"device_id": device_id or str(rec.peer_id), "record": rec.to_json()}


def signed_delete(ident: Identity, timestamp: int | None = None) -> dict[str, Any]:
    ts = int(time.time()) if timestamp is None else timestamp
    sig = ident.sign(unregister_message(ident.peer_id, ts))
    return {"timestamp": ts, "signature": base64.b64encode(sig).decode()}


# -- the seed's contract -------------------------------------------------------


async def test_seed_contract_legacy_device_ids(server: Server) -> None:
    # the seed answered every connected peer, the one that just registered included
    status, body = await server.call("POST", "/register", {"device_id": "device_001"})
    assert status == 200 and body == {"message": MSG_REGISTERED, "peers": ["device_001"]}
    status, body = await server.call("POST", "/register", {"device_id": "device_002"})
    assert status == 200 and body == {"message": MSG_REGISTERED,
                                      "peers": ["device_001", "device_002"]}
    status, body = await server.call("POST", "/register", {"device_id": "device_001"})
    assert status == 200 and body == {"message": MSG_REFRESHED,
                                      "peers": ["device_002", "device_001"]}
    assert await server.call("GET", "/health") == (200, {"status": "ok", "online": 2})


async def test_signed_registration_lists_other_records(server: Server) -> None:
    a, b = Identity.generate("a"), Identity.generate("b")
    await server.call("POST", "/register", {"device_id": "legacy"})
    status, body = await server.call("POST", "/register", reg_body(record_for(a)))
    assert status == 200 and body["message"] == MSG_REGISTERED
    assert body["peers"] == ["legacy", str(a.peer_id)]
    assert [ContactRecord.from_json(r).verify().peer_id for r in body["records"]] == [a.peer_id]
    rec_b = record_for(b, port=9001)
    status, body = await server.call("POST", "/register", reg_body(rec_b))
    assert status == 200
    assert body["peers"] == ["legacy", str(a.peer_id), str(b.peer_id)]
    assert [ContactRecord.from_json(r).verify().peer_id for r in body["records"]] == \
        [a.peer_id, b.peer_id]
    # lower-case, ungrouped spelling of the id names the same registration
    status, body = await server.call("POST", "/register",
                                     reg_body(rec_b, rec_b.peer_id.compact.lower()))
    assert status == 200 and body["message"] == MSG_REFRESHED
    status, page = await server.call("GET", "/peers")
    assert status == 200 and page["next_cursor"] is None
    by_id = {p["device_id"]: p for p in page["peers"]}
    assert set(by_id) == {"legacy", str(a.peer_id), str(b.peer_id)}
    assert by_id["legacy"]["record"] is None
    assert ContactRecord.from_json(by_id[str(b.peer_id)]["record"]) == rec_b
    assert abs(by_id["legacy"]["last_seen"] - time.time()) < 30


# -- persistence and expiry ------------------------------------------------------


async def test_restart_keeps_registrations(tmp_path: Path) -> None:
    ident = Identity.generate()
    srv = Server(tmp_path / "reg.sqlite3", 300.0)
    await srv.start()
    try:
        assert (await srv.call("POST", "/register", reg_body(record_for(ident, seq=3))))[0] == 200
        assert (await srv.call("POST", "/register", {"device_id": "old-device"}))[0] == 200
    finally:
        await srv.stop()
    srv2 = Server(tmp_path / "reg.sqlite3", 300.0)
    await srv2.start()
    try:
        status, page = await srv2.call("GET", "/peers")
        assert status == 200
        assert {p["device_id"] for p in page["peers"]} == {str(ident.peer_id), "old-device"}
        # the replay guard survived too
        status, body = await srv2.call("POST", "/register", reg_body(record_for(ident, seq=2)))
        assert status == 409 and "seq" in body["error"]
    finally:
        await srv2.stop()


async def test_ttl_expiry_and_purge(tmp_path: Path) -> None:
    srv = Server(tmp_path / "reg.sqlite3", 0.4)
    await srv.start()
    try:
        await srv.call("POST", "/register", {"device_id": "short-lived"})
        await srv.call("POST", "/register", reg_body(record_for(Identity.generate())))
        assert (await srv.call("GET", "/health"))[1]["online"] == 2
        await asyncio.sleep(0.5)
        assert (await srv.call("GET", "/health"))[1]["online"] == 0
        assert (await srv.call("GET", "/peers"))[1]["peers"] == []
        _, body = await srv.call("POST", "/register", {"device_id": "fresh"})
        assert body == {"message": MSG_REGISTERED, "peers": ["fresh"]}
        deadline = time.monotonic() + 3.0
        while srv.store.count_rows() > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert srv.store.count_rows() == 1  # the purger removed the expired rows
    finally:
        await srv.stop()


async def test_registration_never_outlives_its_record(server: Server) -> None:
    rec = record_for(Identity.generate(), ttl_s=1)
    assert (await server.call("POST", "/register", reg_body(rec)))[0] == 200
    await asyncio.sleep(1.2)
    assert (await server.call("GET", "/health"))[1]["online"] == 0


# -- impersonation and replay ------------------------------------------------------


async def test_forged_signature_rejected(server: Server) -> None:
    ident, mallory = Identity.generate(), Identity.generate()
    rec = record_for(ident)
    tampered = replace(rec, ports={"tcp": 6666})  # same signature, other content
    status, body = await server.call("POST", "/register", reg_body(tampered))
    assert status == 403 and "signature" in body["error"]
    # mallory's valid signature over a record that claims ident's key
    claimed = replace(record_for(mallory), peer_id=ident.peer_id)
    status, _ = await server.call("POST", "/register", reg_body(claimed))
    assert status == 403
    assert (await server.call("GET", "/health"))[1]["online"] == 0


async def test_record_under_another_device_id_rejected(server: Server) -> None:
    victim, mallory = Identity.generate(), Identity.generate()
    status, body = await server.call(
        "POST", "/register", reg_body(record_for(mallory), str(victim.peer_id)))
    assert status == 403 and "another peer" in body["error"]
    status, body = await server.call("POST", "/register", {"device_id": str(victim.peer_id)})
    assert status == 403 and "record" in body["error"]
    status, body = await server.call(
        "POST", "/register", {"device_id": "legacy", "record": record_for(mallory).to_json()})
    assert status == 400
    assert (await server.call("GET", "/health"))[1]["online"] == 0


async def test_replayed_lower_seq_rejected(server: Server) -> None:
    ident = Identity.generate()
    old, new = record_for(ident, seq=1, port=1111), record_for(ident, seq=2, port=2222)
    assert (await server.call("POST", "/register", reg_body(old)))[0] == 200
    assert (await server.call("POST", "/register", reg_body(new)))[0] == 200
    status, body = await server.call("POST", "/register", reg_body(old))
    assert status == 409 and "error" in body
    status, body = await server.call("POST", "/register", reg_body(new))  # refresh, same seq
    assert status == 200 and body["message"] == MSG_REFRESHED
    _, page = await server.call("GET", "/peers")
    assert page["peers"][0]["record"]["ports"] == {"tcp": 2222}


async def test_expired_and_future_records_rejected(server: Server) -> None:
    ident = Identity.generate()
    stale = record_for(ident, now=time.time() - 7200, ttl_s=3600)
    status, body = await server.call("POST", "/register", reg_body(stale))
    assert status == 400 and "expired" in body["error"]
    future = record_for(ident, now=time.time() + 3600)
    status, body = await server.call("POST", "/register", reg_body(future))
    assert status == 400 and "future" in body["error"]


# -- unregister ------------------------------------------------------------------


async def test_signed_delete(server: Server) -> None:
    ident, other = Identity.generate(), Identity.generate()
    pid = ident.peer_id
    await server.call("POST", "/register", reg_body(record_for(ident)))
    status, _ = await server.call("DELETE", f"/register/{pid}", signed_delete(other))
    assert status == 403
    status, body = await server.call("DELETE", f"/register/{pid}",
                                     signed_delete(ident, int(time.time()) - 1000))
    assert status == 403 and "timestamp" in body["error"]
    status, _ = await server.call("DELETE", f"/register/{pid}", {"timestamp": 1})
    assert status == 400
    assert (await server.call("GET", "/health"))[1]["online"] == 1
    request = signed_delete(ident)
    status, body = await server.call("DELETE", f"/register/{pid.compact}", request)
    assert status == 200 and body == {"message": "Device unregistered."}
    assert (await server.call("GET", "/health"))[1]["online"] == 0
    status, _ = await server.call("DELETE", f"/register/{pid}", request)
    assert status == 404
    # re-registering with a newer record works; the captured request cannot remove it
    await asyncio.sleep(1.05)
    assert (await server.call("POST", "/register", reg_body(record_for(ident, seq=2))))[0] == 200
    status, _ = await server.call("DELETE", f"/register/{pid}", request)
    assert status == 409
    assert (await server.call("GET", "/health"))[1]["online"] == 1


async def test_delete_unknown_and_legacy(server: Server) -> None:
    status, body = await server.call("DELETE", "/register/nobody")
    assert status == 404 and "error" in body
    ident = Identity.generate()
    status, _ = await server.call("DELETE", f"/register/{ident.peer_id}", signed_delete(ident))
    assert status == 404
    await server.call("POST", "/register", {"device_id": "old device"})
    status, _ = await server.call("DELETE", "/register/old%20device")
    assert status == 200
    assert (await server.call("GET", "/health"))[1]["online"] == 0


# -- bad input: always 4xx JSON, never a 500 ---------------------------------------


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_REQUESTS: list[tuple[str, str, bytes | None, int]] = [
    ("POST", "/register", b"{not json", 400),
    ("POST", "/register", b"", 400),
    ("POST", "/register", b"\xff\xfe\x00garbage", 400),
    ("POST", "/register", b"[1, 2, 3]", 400),
    ("POST", "/register", b'"device"', 400),
    ("POST", "/register", b"{}", 400),
    ("POST", "/register", b'{"device_id": 42}', 400),
    ("POST", "/register", b'{"device_id": null}', 400),
    ("POST", "/register", b'{"device_id": ["a"]}', 400),
    ("POST", "/register", b'{"device_id": ""}', 400),
    ("POST", "/register", json.dumps({"device_id": "x" * 129}).encode(), 400),
    ("POST", "/register", b'{"device_id": "bad\\nid"}', 400),
    ("POST", "/register", b'{"device_id": "\\ud800"}', 400),
    ("POST", "/register", b'{"device_id": " padded "}', 400),
    ("POST", "/register", b'{"device_id": "x", "record": 5}', 400),
    ("POST", "/register", _nested(5000), 400),
    ("POST", "/register", b'{"device_id": "' + b"x" * 20000 + b'"}', 413),
    ("PUT", "/register", b"{}", 405),
    ("GET", "/register", None, 405),
    ("POST", "/peers", b"{}", 405),
    ("GET", "/nowhere", None, 404),
    ("GET", "/peers?limit=abc", None, 400),
    ("GET", "/peers?limit=0", None, 400),
    ("GET", "/peers?limit=-5", None, 400),
    ("GET", "/peers?limit=99999999999999999999", None, 400),
    ("GET", "/peers?cursor=%%%%", None, 400),
    ("GET", "/peers?cursor=" + "A" * 300, None, 400),
    ("DELETE", "/register/" + "x" * 200, None, 400),
]


@pytest.mark.parametrize(("method", "path", "data", "status"), BAD_REQUESTS)
async def test_bad_input_answers_4xx_json(server: Server, method: str, path: str,
                                          data: bytes | None, status: int) -> None:
    got, body = await server.call(method, path, data=data)
    assert got == status and isinstance(body["error"], str) and body["error"]
    assert (await server.call("GET", "/health"))[0] == 200


async def test_bad_records_answer_4xx(server: Server) -> None:
    ident = Identity.generate()
    good = record_for(ident).to_json()
    variants: list[dict[str, Any]] = [
        {**good, "seq": -1}, {**good, "seq": "1"}, {**good, "seq": True},
        {**good, "ports": {"tcp": 70000}}, {**good, "ports": {"smtp": 25}}, {**good, "ports": []},
        {**good, "hosts": []}, {**good, "hosts": ["h"] * 20}, {**good, "hosts": [1]},
        {**good, "name": "\ud800"}, {**good, "name": "x" * 100},
        {**good, "signature": "not base64!"}, {**good, "signature": "AAAA"},
        {**good, "expires": good["timestamp"]}, {k: v for k, v in good.items() if k != "hosts"},
        {**good, "peer_id": "nonsense"},
    ]
    for rec in variants:
        status, body = await server.call("POST", "/register",
                                         {"device_id": str(ident.peer_id), "record": rec})
        assert status in (400, 403), (rec, status, body)
        assert "error" in body
    assert (await server.call("GET", "/health"))[1]["online"] == 0


async def test_oversize_chunked_body_without_length(server: Server) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 1024

    status, body = await server.call("POST", "/register", data=chunks())  # type: ignore[arg-type]
    assert status == 413 and "error" in body


# -- paging ------------------------------------------------------------------------


async def test_paging_with_cursor(server: Server) -> None:
    server.store.bulk_load(
        [(f"dev{i:04d}", None, time.time(), time.time() + 300) for i in range(250)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        path = "/peers?limit=100" + (f"&cursor={cursor}" if cursor else "")
        status, page = await server.call("GET", path)
        assert status == 200
        seen += [p["device_id"] for p in page["peers"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"dev{i:04d}" for i in range(250)] and pages == 3
    _, page = await server.call("GET", "/peers")
    assert len(page["peers"]) == 100  # default limit
    server.store.bulk_load(
        [(f"more{i:04d}", None, time.time(), time.time() + 300) for i in range(1000)])
    _, page = await server.call("GET", "/peers?limit=5000")
    assert len(page["peers"]) == 1000 and page["next_cursor"] is not None  # capped


async def test_full_registry_answers_503_json(tmp_path: Path) -> None:
    from aiohttp import web

    from bootstrap.server import create_app

    runner = web.AppRunner(create_app(tmp_path / "r.sqlite3", 300.0, max_registrations=1))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/register", json={"device_id": "one"}) as resp:
                assert resp.status == 200
            async with http.post(url + "/register", json={"device_id": "two"}) as resp:
                assert resp.status == 503 and "full" in (await resp.json())["error"]
            async with http.post(url + "/register", json={"device_id": "one"}) as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
