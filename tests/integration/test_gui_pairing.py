"""The dashboard's pairing endpoints on a real socket, with a fake daemon: an invitation
answers once its code exists and its row follows the exchange (waiting, connected,
paired / failed / cancelled); DELETE kills the code; at most MAX_INVITES wait at once;
accept passes the code through; bad bodies are 400 and start nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.gui.pairing import MAX_INVITES
from node.gui.server import GuiServer
from node.pairing import WrongCode


@dataclass
class FakePairing:
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    met: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0
    fail: bool = False

    async def dispatch(self, cmd: str, args: dict[str, Any], emit: Any) -> Any:
        self.calls.append((cmd, args))
        if cmd == "invite":
            await emit({"type": "code", "code": f"{len(self.calls)}-adroitness-aardvark",
                        "expires_at": 1e10})
            try:
                await self.met.wait()
                await emit({"type": "connected"})
                await self.done.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            if self.fail:
                raise WrongCode()
            return {"peer_id": "Q" * 56, "alias": args["name"], "name": "q",
                    "verification": "a-b-c", "fingerprint": "f"}
        if cmd == "accept":
            return {"peer_id": "R" * 56, "alias": args["name"], "name": "r",
                    "verification": "x-y-z", "fingerprint": "f"}
        return {}


@dataclass
class Gui:
    fake: FakePairing
    base: str
    headers: dict[str, str]


@pytest.fixture
async def gui(tmp_path: Path) -> AsyncIterator[Gui]:
    fake = FakePairing()
    server = GuiServer(fake.dispatch, home=tmp_path, port=0)
    await server.start()
    try:
        yield Gui(fake, f"http://127.0.0.1:{server.port}",
                  {"Authorization": f"Bearer {server.token}"})
    finally:
        await server.stop()


async def wait_state(http: aiohttp.ClientSession, gui: Gui, row_id: str, state: str) -> Any:
    async with asyncio.timeout(5):
        while True:
            async with http.get(f"{gui.base}/api/invite/{row_id}") as r:
                row = await r.json()
            if row["state"] == state:
                return row
            await asyncio.sleep(0.02)


async def test_invite_answers_with_the_code_and_follows_the_exchange(gui: Gui) -> None:
    async with aiohttp.ClientSession(headers=gui.headers) as http:
        async with http.post(f"{gui.base}/api/invite", json={"name": "laptop"}) as r:
            assert r.status == 202
            row = await r.json()
        assert row["code"].endswith("-adroitness-aardvark") and row["state"] == "waiting"
        assert gui.fake.calls[-1] == ("invite", {"name": "laptop", "expires_s": None})
        gui.fake.met.set()
        await wait_state(http, gui, row["id"], "connected")
        gui.fake.done.set()
        done = await wait_state(http, gui, row["id"], "paired")
        assert done["result"]["alias"] == "laptop"


async def test_a_failed_invitation_says_why(gui: Gui) -> None:
    gui.fake.fail = True
    async with aiohttp.ClientSession(headers=gui.headers) as http:
        async with http.post(f"{gui.base}/api/invite", json={}) as r:
            row = await r.json()
        gui.fake.met.set()
        gui.fake.done.set()
        failed = await wait_state(http, gui, row["id"], "failed")
        assert "wrong code" in failed["error"]


async def test_cancel_kills_the_code_and_the_number_waiting_is_bounded(gui: Gui) -> None:
    async with aiohttp.ClientSession(headers=gui.headers) as http:
        rows = []
        for _ in range(MAX_INVITES):
            async with http.post(f"{gui.base}/api/invite", json={}) as r:
                assert r.status == 202
                rows.append(await r.json())
        async with http.post(f"{gui.base}/api/invite", json={}) as r:
            assert r.status == 400 and "already waiting" in (await r.json())["error"]["message"]
        async with http.delete(f"{gui.base}/api/invite/{rows[0]['id']}") as r:
            assert r.status == 200 and (await r.json())["state"] == "cancelled"
        assert gui.fake.cancelled == 1
        async with http.post(f"{gui.base}/api/invite", json={}) as r:
            assert r.status == 202  # a slot is free again
        async with http.get(f"{gui.base}/api/invite/nope") as r:
            assert r.status == 404


async def test_accept_and_bad_bodies(gui: Gui) -> None:
    async with aiohttp.ClientSession(headers=gui.headers) as http:
        async with http.post(f"{gui.base}/api/accept",
                             json={"code": " 7-adroitness-aardvark ", "name": "phone"}) as r:
            assert r.status == 200 and (await r.json())["alias"] == "phone"
        assert gui.fake.calls[-1] == ("accept", {"code": "7-adroitness-aardvark",
                                                 "name": "phone"})
        before = len(gui.fake.calls)
        for body in ({}, {"code": 7}, {"code": "x" * 200}, [1]):
            async with http.post(f"{gui.base}/api/accept", json=body) as r:
                assert r.status == 400
        for body in ({"expires_s": 0}, {"expires_s": "10m"}, {"name": 5}):
            async with http.post(f"{gui.base}/api/invite", json=body) as r:
                assert r.status == 400
        assert len(gui.fake.calls) == before  # nothing reached the node
