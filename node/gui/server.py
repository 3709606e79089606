"""The dashboard's HTTP side: an aiohttp app with one static page and a JSON API.

Who may talk to it:
- every request names this server in its Host header (127.0.0.1:PORT, localhost:PORT,
  [::1]:PORT or the --gui-host): a page on another name that resolves here (DNS
  rebinding) is refused with 403;
- every request carries the node's token: `Authorization: Bearer TOKEN` (curl), or the
  session cookie the page got by opening `/?token=TOKEN` once (HttpOnly,
  SameSite=Strict; the token is then dropped from the address bar by a redirect).
  Without it: 401. The token lives in HOME/gui.token, mode 0600 (`node gui` prints it);
- a state-changing request (POST, DELETE) on a cookie session also carries the
  session's CSRF token in `X-CSRF-Token` (the page gets it from `GET /api/session`), and
  its Origin, when sent, is this server: else 403. A Bearer header is proof enough
  (a page cannot make a browser send one to another origin without CORS, which this
  server never allows), as Syncthing treats its API key.
- every answer carries `Content-Security-Policy: default-src 'self'` (the page loads
  nothing from anywhere else: no CDN), no framing, no sniffing, no referrer.

What it does is the control commands' work: `dispatch(cmd, args, emit)` is the
daemon's ControlServer.dispatch, so a peer list, a share or a cancel here is exactly
`node peers`, `node share`, `node cancel`. Imports errors and statefiles only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from node.errors import (
    ConfigError,
    LocalIOError,
    P2PError,
    PeerError,
    PeerUnreachable,
    UnknownPeer,
    bind_errors,
)
from node.gui import Dispatch
from node.gui.pairing import PairingRoutes, json_object
from node.gui.token import dashboard_info, dashboard_url, load_or_create_token

log = logging.getLogger("p2pfs.gui")


SESSION_COOKIE_PREFIX = "p2pfs_session_"  # + port: two nodes' dashboards on one host
MAX_SESSIONS = 64
SESSION_TTL_S = 7 * 24 * 3600.0
MAX_BODY_BYTES = 64 * 1024
MAX_SHARE_PATHS = 100
MAX_TEXT_CHARS = 4096
SSE_HEARTBEAT_S = 15.0
MAX_FOLDER_PEERS_SENT = 64
FOLDER_ACTIONS = frozenset({"pause", "resume", "rescan", "override", "revert"})
SHUTDOWN_S = 0.5
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STATIC_FILES = {  # url name -> content type; nothing else under /static is served
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "pairing.js": "text/javascript; charset=utf-8",  # the peers page's invite/accept
}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'self'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ---------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    csrf: str
    created_at: float


@dataclass(slots=True)
class SessionTable:
    """Cookie sessions, bounded: the oldest is dropped when a new one would not fit."""

    max_sessions: int = MAX_SESSIONS
    ttl_s: float = SESSION_TTL_S
    _by_id: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    def new(self, now: float) -> Session:
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now)
        self._by_id[s.id] = s
        return s

    def get(self, sid: str, now: float) -> Session | None:
        s = self._by_id.get(sid)
        if s is None:
            return None
        if now - s.created_at > self.ttl_s:
            del self._by_id[sid]
            return None
        return s


# ---------------------------------------------------------------------------- errors


def _status_for(exc: P2PError) -> int:
    if isinstance(exc, UnknownPeer):
        return 404
    if isinstance(exc, PeerUnreachable):
        return 502
    if isinstance(exc, PeerError):
        return 409
    return 400


# aiohttp's own refusals under /api/, as JSON errors: status -> (type, message)
_API_HTTP_ERRORS = {
    404: ("NotFound", "no such API endpoint: {method} {path} (docs/api.md lists them)"),
    405: ("MethodNotAllowed", "{method} is not allowed on {path} (docs/api.md)"),
    413: ("BodyTooLarge", "the request body is too large (at most {max_bytes:,} bytes)"),
}


def _error(status: int, message: str, kind: str = "P2PError") -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=lambda o: json.dumps(o, default=str))


class _Refused(Exception):
    """A request the auth layer turns away: status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- server


class GuiServer:
    """The dashboard on host:port; `start()` binds (PortUnavailable when it cannot)."""

    def __init__(self, dispatch: Dispatch, *, home: Path, host: str = "127.0.0.1",
                 port: int = 8474, commands: Callable[[], list[str]] | None = None,
                 token: str | None = None) -> None:
        self.dispatch = dispatch
        self.home = home
        self.host = host
        self.port = port
        self._commands = commands or (lambda: [])
        # the lazy dashboard read (or made) it at the node's start already
        self.token = token if token is not None else load_or_create_token(home)
        self.sessions = SessionTable()
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._jobs: set[asyncio.Task[Any]] = set()
        self.pairing = PairingRoutes(dispatch)  # invite / accept a code (node/gui/pairing.py)
        self.app = self._build_app()

    # -- lifecycle -----------------------------------------------------------------
    async def start(self, sockets: list[socket.socket] | None = None) -> int:
        """Serve on host:port, or on ``sockets`` already bound and listening (the lazy
        dashboard of node/gui/lazy.py binds them at start and hands them over here)."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        try:
            if sockets is None:
                with bind_errors("gui", self.host, self.port):
                    site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
                    await site.start()
            else:
                for sock in sockets:
                    await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:
            self.port = self.addresses()[0][1]
        if sockets is None:
            log.info("dashboard on %s (run `node gui` for the address with its token)",
                     dashboard_url(self.host, self.port))
        return self.port

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every socket the dashboard listens on."""
        out = []
        for site in self._runner.sites if self._runner is not None else []:
            server = getattr(site, "_server", None)  # aiohttp keeps the asyncio Server here
            for sock in getattr(server, "sockets", None) or []:
                host, port = sock.getsockname()[:2]
                out.append((str(host), int(port)))
        return out

    async def stop(self) -> None:
        await self.pairing.stop()
        for task in list(self._streams) + list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._streams, *self._jobs, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def url(self, *, with_token: bool = True) -> str:
        return dashboard_url(self.host, self.port, self.token if with_token else None)

    def info(self) -> dict[str, Any]:
        """What `node gui` prints."""
        return dashboard_info(self.home, self.host, self.port, self.token)

    # -- app -----------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/favicon.ico", self._no_icon)
        r.add_get("/static/{name}", self._static)
        r.add_get("/api/session", self._session)
        r.add_get("/api/status", self._simple("status"))
        r.add_get("/api/peers", self._peers)
        r.add_post("/api/trust", self._trust)
        r.add_delete("/api/trust/{peer}", self._untrust)
        r.add_get("/api/folders", self._simple("folders"))
        r.add_get("/api/transfers", self._simple("transfers"))
        r.add_post("/api/transfers/{id}/cancel", self._cancel)
        r.add_post("/api/share", self._share)
        r.add_get("/api/events", self._events)
        r.add_get("/api/log", self._log)
        self._add_folder_routes(r)
        self.pairing.add_to(r)
        return app

    # -- the guard: Host, token, CSRF, Origin ---------------------------------------
    def _allowed_hosts(self) -> set[str]:
        names = {"127.0.0.1", "localhost", "[::1]"}
        if self.host and self.host not in ("0.0.0.0", "::"):
            names.add(f"[{self.host}]" if ":" in self.host else self.host)
        return {f"{n}:{self.port}".lower() for n in names}

    def _check(self, request: web.Request) -> Session | None:
        """Raises _Refused; returns the cookie session (None for a Bearer request)."""
        host = request.headers.get("Host", "").lower()
        if host not in self._allowed_hosts():
            raise _Refused(403, "refused: the Host header does not name this dashboard")
        now = time.time()
        session: Session | None = None
        auth = request.headers.get("Authorization", "")
        if auth:
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(), self.token.encode()):
                raise _Refused(401, "refused: wrong token in the Authorization header")
        else:
            sid = request.cookies.get(self._cookie_name(), "")
            session = self.sessions.get(sid, now) if sid else None
            if session is None:
                raise _Refused(401, "refused: no token; open the address `node gui` prints")
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin is not None and self._origin_host(origin) not in self._allowed_hosts():
                raise _Refused(403, "refused: cross-origin request")
            if session is not None and not hmac.compare_digest(
                    request.headers.get("X-CSRF-Token", "").encode(), session.csrf.encode()):
                raise _Refused(403, "refused: missing or wrong X-CSRF-Token")
        return session

    @staticmethod
    def _origin_host(origin: str) -> str:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return ""
        return parts.netloc.lower() if parts.scheme == "http" else ""

    def _cookie_name(self) -> str:
        return f"{SESSION_COOKIE_PREFIX}{self.port}"

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            response = await self._guarded(request, handler)
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp: the same headers
            if request.path.startswith("/api/") and exc.status in _API_HTTP_ERRORS:
                # a script reading the JSON API gets JSON, not aiohttp's "404: Not Found"
                kind, what = _API_HTTP_ERRORS[exc.status]
                response = _error(exc.status, what.format(method=request.method,
                                                          path=request.path,
                                                          max_bytes=MAX_BODY_BYTES), kind)
                if "Allow" in exc.headers:  # a 405 says which methods (RFC 9110 §15.5.6)
                    response.headers["Allow"] = exc.headers["Allow"]
            else:
                for key, value in SECURITY_HEADERS.items():
                    exc.headers.setdefault(key, value)
                raise
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def _guarded(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None and request.method == "GET" and request.path == "/":
            return self._login(request, token)
        try:
            self._check(request)
        except _Refused as exc:
            if request.path.startswith("/api/"):
                return _error(exc.status, str(exc), "Refused")
            return web.Response(status=exc.status, text=f"{exc}\n",
                                content_type="text/plain")
        try:
            return await handler(request)
        except P2PError as exc:
            return _error(_status_for(exc), str(exc), type(exc).__name__)

    def _login(self, request: web.Request, token: str) -> web.StreamResponse:
        """`/?token=T`: check the Host and the token, start a cookie session, and
        redirect to `/` so the token leaves the address bar and the history."""
        if request.headers.get("Host", "").lower() not in self._allowed_hosts():
            return web.Response(status=403, text="refused: the Host header does not name "
                                                 "this dashboard\n")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return web.Response(status=401, text="refused: wrong token\n")
        session = self.sessions.new(time.time())
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(self._cookie_name(), session.id, httponly=True, samesite="Strict",
                            path="/", max_age=int(SESSION_TTL_S))
        return response

    # -- pages -----------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=_static_bytes("index.html"),
                            content_type="text/html", charset="utf-8")

    async def _no_icon(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        ctype = STATIC_FILES.get(name)
        if ctype is None:
            raise web.HTTPNotFound()
        return web.Response(body=_static_bytes(name), headers={"Content-Type": ctype})

    # -- API -------------------------------------------------------------------------
    async def _call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        async def ignore(event: dict[str, Any]) -> None:
            return None

        return await self.dispatch(cmd, args or {}, ignore)

    def _simple(self, cmd: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return _json(await self._call(cmd))

        return handler

    async def _session(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(self._cookie_name(), "")
        session = None if "Authorization" in request.headers else self.sessions.get(
            sid, time.time())
        status = await self._call("status")
        return _json({
            "csrf_token": session.csrf if session else None,
            "node": {k: status.get(k) for k in ("peer_id", "name", "fingerprint", "ports")},
            "commands": self._commands(),
        })

    async def _peers(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call("peers"))

    async def _trust(self, request: web.Request) -> web.StreamResponse:
        body = await json_object(request)
        peer, name = body.get("peer"), body.get("name", "")
        if not isinstance(peer, str) or not peer or len(peer) > MAX_TEXT_CHARS:
            raise UnknownPeer("give the peer to trust as {\"peer\": ID, \"name\": ALIAS}")
        if not isinstance(name, str) or len(name) > MAX_TEXT_CHARS:
            raise ConfigError("name must be a string")
        return _json(await self._call("trust", {"peer": peer, "name": name}))

    async def _untrust(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call("untrust", {"peer": request.match_info["peer"]}))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call("cancel", {"id": request.match_info["id"]}))

    async def _share(self, request: web.Request) -> web.StreamResponse:
        """Start `node share PATH... [--to PEER...]`; answers once the transfers have
        started (202, their rows) or the share was refused (its error)."""
        body = await json_object(request)
        paths, to, transport = body.get("paths"), body.get("to") or [], body.get("transport")
        if (not isinstance(paths, list) or not paths or len(paths) > MAX_SHARE_PATHS
                or not all(isinstance(p, str) and p for p in paths)):
            raise ConfigError(f"paths must be a list of 1-{MAX_SHARE_PATHS} paths")
        if not isinstance(to, list) or not all(isinstance(t, str) for t in to):
            raise ConfigError("to must be a list of peers")
        if transport is not None and transport not in ("tcp", "udp", "quic"):
            raise ConfigError("transport must be tcp, udp or quic")
        resolved = []
        for text in paths:  # as `node share`: a path on this machine, and one that exists
            p = Path(text).expanduser()
            if not p.is_absolute():
                raise ConfigError(f"{text} is not an absolute path on this machine")
            if not p.exists():
                raise LocalIOError(f"{p} does not exist")
            resolved.append(str(p.resolve()))
        started: list[dict[str, Any]] = []
        moving = asyncio.Event()

        async def emit(event: dict[str, Any]) -> None:
            if event.get("type") == "started":
                started.append({k: v for k, v in event.items() if k != "type"})
            moving.set()

        job = asyncio.ensure_future(self.dispatch(
            "share", {"paths": resolved, "to": to, "transport": transport}, emit))
        self._jobs.add(job)
        job.add_done_callback(self._job_done)
        waiter = asyncio.ensure_future(moving.wait())
        try:
            await asyncio.wait({job, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if job.done() and not started:
            job.result()  # the share was refused: its P2PError is the answer
        return _json({"transfers": started}, status=202)

    def _job_done(self, job: asyncio.Task[Any]) -> None:
        self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.info("share from the dashboard ended: %s", job.exception())

    # -- synced folders (`node folder ...`: the folder_* control commands) ------------
    def _add_folder_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/api/sync-folders", self._folder_list)
        r.add_post("/api/sync-folders", self._folder_add)
        r.add_get("/api/sync-folders/{id}", self._folder_status)
        r.add_delete("/api/sync-folders/{id}", self._folder_remove)
        r.add_post("/api/sync-folders/{id}/{action}", self._folder_action)

    async def _folder_list(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call("folder_list"))

    async def _folder_status(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call("folder_status", {"id": request.match_info["id"]}))

    async def _folder_add(self, request: web.Request) -> web.StreamResponse:
        """`node folder add PATH --id ID [--peer P]... [--mode M] [--label L]`; the node
        checks everything (path, id, peers trusted, mode) as for the CLI."""
        body = await json_object(request)
        args: dict[str, Any] = {}
        for key in ("path", "id", "mode", "label"):
            value = body.get(key, "")
            if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
                raise ConfigError(f"{key} must be a string")
            args[key] = value
        peers = body.get("peers") or []
        if (not isinstance(peers, list) or len(peers) > MAX_FOLDER_PEERS_SENT
                or not all(isinstance(p, str) and 0 < len(p) <= MAX_TEXT_CHARS
                           for p in peers)):
            raise ConfigError(f"peers must be a list of at most {MAX_FOLDER_PEERS_SENT} "
                              "peer ids or aliases")
        args["peers"] = peers
        return _json(await self._call("folder_add", args), status=201)

    async def _folder_remove(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._call("folder_remove", {"id": request.match_info["id"]}))

    async def _folder_action(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        if action not in FOLDER_ACTIONS:
            raise web.HTTPNotFound()
        return _json(await self._call(f"folder_{action}", {"id": request.match_info["id"]}))

    async def _log(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        args: dict[str, Any] = {}
        for key in ("peer", "path", "since"):
            value = q.get(key, "").strip()
            if len(value) > MAX_TEXT_CHARS:
                raise ConfigError(f"{key} is too long")
            if value:
                args[key] = value
        if "since" in args:  # the daemon's words name the CLI's --since, not this query
            from node.gossip.log import ms_from_text

            try:
                ms_from_text(args["since"])
            except ConfigError:
                raise ConfigError(f"since: {args['since']!r} is not a time (epoch ms, or "
                                  "e.g. 10m, 2h, 3d)") from None
        limit = q.get("limit", "")
        if limit:
            if not limit.isdigit():
                raise ConfigError("limit must be a number")
            args["limit"] = int(limit)
        return _json(await self._call("log", args))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Notifications as server-sent events (`id:` is the notification id; a
        reconnecting EventSource resumes after Last-Event-ID), or with `stream=0` one
        JSON answer with those after `since`."""
        since_text = request.query.get("since") or request.headers.get("Last-Event-ID", "")
        if since_text and not since_text.isdigit():
            raise ConfigError("since must be a notification id (a whole number)")
        since = int(since_text) if since_text else None
        if request.query.get("stream") == "0":
            events: list[dict[str, Any]] = []

            async def collect(event: dict[str, Any]) -> None:
                events.append(event)

            reply = await self.dispatch("events", {"since": since, "follow": False}, collect)
            return _json({"events": events, "last_id": reply.get("last_id")})

        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no", **SECURITY_HEADERS})
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)

        async def send(event: dict[str, Any]) -> None:
            data = json.dumps(event, default=str, separators=(",", ":"))
            eid = event.get("id")
            head = f"id: {eid}\n" if isinstance(eid, int) else ""
            await response.write(f"{head}data: {data}\n\n".encode())

        async def heartbeat() -> None:  # finds a closed tab within SSE_HEARTBEAT_S
            while True:
                await asyncio.sleep(SSE_HEARTBEAT_S)
                await response.write(b": keep-alive\n\n")

        beat = asyncio.ensure_future(heartbeat())
        follow = asyncio.ensure_future(
            self.dispatch("events", {"since": since, "follow": True}, send))
        try:
            await response.write(b"retry: 2000\n\n")
            await asyncio.wait({beat, follow}, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for t in (beat, follow):
                t.cancel()
            await asyncio.gather(beat, follow, return_exceptions=True)
            self._streams.discard(task)
        return response


def _static_bytes(name: str) -> bytes:
    return resources.files("node.gui").joinpath("static", name).read_bytes()

