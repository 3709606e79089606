"""The dashboard's pairing endpoints: invite with a code, accept a code (peers page).

    POST   /api/invite        {"name"?, "expires_s"?} -> 202 {"id", "code", "expires_at"}
    GET    /api/invite/{id}   -> {"id", "code", "state", "result"?, "error"?}
    DELETE /api/invite/{id}   -> the invitation's row, state "cancelled" (the code dies)
    POST   /api/accept        {"code", "name"?} -> `node accept CODE --json`'s answer

An invitation runs the daemon's `invite` control command in the background (as `node
invite` would, waiting for the other device) and answers as soon as the code exists;
the page polls its row. At most MAX_INVITES run at once; finished rows are kept for
KEEP_DONE_S so the page can read the outcome. Requests pass the server's guard first
(Host, token, CSRF, Origin: node/gui/server.py). Imports errors only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aiohttp import web

from node.errors import ConfigError, P2PError, UnknownPeer
from node.gui import Dispatch

log = logging.getLogger("p2pfs.gui")


MAX_INVITES = 4  # running at once
MAX_ROWS = 32
KEEP_DONE_S = 600.0
MAX_CODE_CHARS = 80
MAX_NAME_CHARS = 64
MIN_EXPIRES_S = 5
MAX_EXPIRES_S = 3600


class InviteState(Enum):
    WAITING = "waiting"  # the code is out; nobody used it yet
    CONNECTED = "connected"  # the other device is running the exchange
    PAIRED = "paired"
    FAILED = "failed"
    CANCELLED = "cancelled"



async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or ConfigError (a 400) naming what was wrong;
    every dashboard endpoint that takes a body reads it through here."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    return body

@dataclass
class Invitation:
    id: str
    code: str = ""
    expires_at: float = 0.0
    state: InviteState = InviteState.WAITING
    result: dict[str, Any] | None = None
    error: str = ""
    ended_at: float = 0.0
    task: asyncio.Task[Any] | None = field(default=None, repr=False)

    def set_state(self, state: InviteState) -> None:
        log.debug("dashboard invitation %s: %s -> %s", self.id, self.state.value, state.value)
        self.state = state
        if state in (InviteState.PAIRED, InviteState.FAILED, InviteState.CANCELLED):
            self.ended_at = time.time()

    @property
    def running(self) -> bool:
        return self.state in (InviteState.WAITING, InviteState.CONNECTED)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "code": self.code, "expires_at": self.expires_at,
                               "state": self.state.value}
        if self.result is not None:
            out["result"] = self.result
        if self.error:
            out["error"] = self.error
        return out


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=lambda o: json.dumps(o, default=str))


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ConfigError(f"{key} must be text of at most {limit} characters")
    return value.strip()


class PairingRoutes:
    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.invitations: OrderedDict[str, Invitation] = OrderedDict()

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/invite", self.invite)
        router.add_get("/api/invite/{id}", self.invite_row)
        router.add_delete("/api/invite/{id}", self.invite_cancel)
        router.add_post("/api/accept", self.accept)

    async def stop(self) -> None:
        tasks = [i.task for i in self.invitations.values() if i.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _prune(self) -> None:
        now = time.time()
        for key in [k for k, i in self.invitations.items()
                    if not i.running and now - i.ended_at > KEEP_DONE_S]:
            del self.invitations[key]
        while len(self.invitations) > MAX_ROWS:
            oldest = next((k for k, i in self.invitations.items() if not i.running), None)
            if oldest is None:
                break
            del self.invitations[oldest]

    def _row(self, request: web.Request) -> Invitation:
        row = self.invitations.get(request.match_info["id"])
        if row is None:
            raise UnknownPeer("no such invitation (it ended long ago, or never was)")
        return row

    async def invite(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        name = _text(body, "name", MAX_NAME_CHARS)
        expires = body.get("expires_s")
        if expires is not None and (isinstance(expires, bool)
                                    or not isinstance(expires, (int, float))
                                    or not MIN_EXPIRES_S <= expires <= MAX_EXPIRES_S):
            raise ConfigError(f"expires_s must be {MIN_EXPIRES_S}-{MAX_EXPIRES_S} seconds")
        self._prune()
        if sum(1 for i in self.invitations.values() if i.running) >= MAX_INVITES:
            raise ConfigError(f"{MAX_INVITES} invitations are already waiting; cancel one")
        row = Invitation(os.urandom(6).hex())
        has_code = asyncio.Event()

        async def emit(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind == "code":
                row.code = str(event.get("code", ""))
                row.expires_at = float(event.get("expires_at") or 0)
                has_code.set()
            elif kind == "connected" and row.state is InviteState.WAITING:
                row.set_state(InviteState.CONNECTED)

        async def run() -> None:
            try:
                row.result = await self.dispatch(
                    "invite", {"name": name, "expires_s": expires}, emit)
                row.set_state(InviteState.PAIRED)
            except asyncio.CancelledError:
                row.set_state(InviteState.CANCELLED)
                raise
            except P2PError as exc:
                row.error = str(exc)
                row.set_state(InviteState.FAILED)
            finally:
                has_code.set()

        row.task = asyncio.ensure_future(run())
        self.invitations[row.id] = row
        await has_code.wait()
        if not row.code:  # refused before a code existed (no rendezvous, bad alias)
            del self.invitations[row.id]
            raise P2PError(row.error or "the invitation did not start")
        return _json(row.to_json(), status=202)

    async def invite_row(self, request: web.Request) -> web.StreamResponse:
        return _json(self._row(request).to_json())

    async def invite_cancel(self, request: web.Request) -> web.StreamResponse:
        row = self._row(request)
        if row.running and row.task is not None:
            row.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await row.task
        return _json(row.to_json())

    async def accept(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        code = _text(body, "code", MAX_CODE_CHARS)
        if not code:
            raise ConfigError("give the code the other device shows as {\"code\": CODE}")
        name = _text(body, "name", MAX_NAME_CHARS)

        async def ignore(event: dict[str, Any]) -> None:
            return None

        return _json(await self.dispatch("accept", {"code": code, "name": name}, ignore))
