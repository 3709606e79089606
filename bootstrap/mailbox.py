"""The pairing mailbox: where two nodes holding the same one-time code meet.

HTTP API (JSON; binary bodies are base64; every error is ``{"error", "reason"}``):

* ``POST /pair/allocate`` ``{"ttl_s": N}`` -> ``{"nameplate", "token", "expires_at"}``:
  the inviter gets the lowest free nameplate number and its side token.
* ``POST /pair/{nameplate}/claim`` -> ``{"token", "expires_at"}``: the accepter; a
  nameplate is claimed once (409 ``used`` after that).
* ``POST /pair/{nameplate}/post`` ``{"token", "phase": "pake"|"box", "body"}``: each side
  posts each phase once, at most MAX_MESSAGE_BYTES.
* ``GET /pair/{nameplate}/fetch?after=K&wait=S`` (header ``X-Pair-Token``): the other
  side's messages after the first K, waiting up to S seconds for one to arrive.
* ``POST /pair/{nameplate}/release`` ``{"token", "outcome": "ok"|"failed"|"cancelled"}``.

The mailbox forgets a nameplate's messages once both sides have fetched both boxes (the
first complete exchange), when either side reports a failed PAKE, and at expiry; a
forgotten nameplate answers 410 with ``reason`` ``used``, ``failed``, ``expired`` or
``cancelled`` (the inviter gave up: its CLI was interrupted) for TOMBSTONE_KEEP_S after
it is forgotten, so the other side learns why. Per source address, allocations,
claims (the guessing budget) and fetches each spend a token bucket (429).

The server sees only nameplates, SPAKE2 messages and ciphertext, never a code's words, a
key or an identity. ``MailboxStore`` is pure (``now`` passed in); the aiohttp handlers
are a thin shell. Imports bootstrap.limits only; routes are added by the server's
``create_app``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from aiohttp import web

from bootstrap.limits import RateLimiter, source_key

PHASES = ("pake", "box")
SIDES = ("A", "B")
MAX_MESSAGE_BYTES = 4096
MAX_REQUEST_BYTES = 8 * 1024
MAX_NAMEPLATES = 10_000
MAX_NAMEPLATE = 999_999
DEFAULT_TTL_S = 600
MIN_TTL_S = 5
MAX_TTL_S = 3600
MAX_WAIT_S = 30.0
BODY_TIMEOUT_S = 10.0
# a forgotten nameplate keeps only its number and why, this long, so a late side is told
# "used", "failed" or "expired" instead of "unknown"
TOMBSTONE_KEEP_S = 600.0
TOKEN_BYTES = 16
# per source address: allocations, claims (each claim is one guess at a code) and fetches
ALLOCATE_RATE_PER_S, ALLOCATE_BURST = 1.0, 30
CLAIM_RATE_PER_S, CLAIM_BURST = 0.5, 10
FETCH_RATE_PER_S, FETCH_BURST = 20.0, 200


class Gone(Enum):
    """Why a nameplate no longer exists (what a late side is told)."""

    USED = "used"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class MailboxError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


@dataclass(slots=True)
class Nameplate:
    number: int
    expires_at: float
    tokens: dict[str, str]  # side -> token
    messages: dict[str, list[tuple[str, bytes]]] = field(
        default_factory=lambda: {s: [] for s in SIDES})
    fetched_box: set[str] = field(default_factory=set)  # sides that have read the other's box

    def side_of(self, token: str) -> str:
        for side, known in self.tokens.items():
            if secrets.compare_digest(known, token):
                return side
        raise MailboxError(403, "not a side of this nameplate", "token")


@dataclass(frozen=True, slots=True)
class Tombstone:
    reason: Gone
    until: float


class MailboxStore:
    """Nameplates in memory: bounded in number, in messages per side and in message size."""

    def __init__(self, *, max_nameplates: int = MAX_NAMEPLATES,
                 token: Callable[[], str] = lambda: secrets.token_hex(TOKEN_BYTES)) -> None:
        self.max_nameplates = max_nameplates
        self._token = token
        self._live: dict[int, Nameplate] = {}
        self._gone: dict[int, Tombstone] = {}
        self.version = 0  # bumps on every post/forget: long polls wake on it

    def __len__(self) -> int:
        return len(self._live)

    def purge(self, now: float) -> None:
        for number, plate in list(self._live.items()):
            if plate.expires_at <= now:
                self._forget(number, Gone.EXPIRED, now)
        for number, stone in list(self._gone.items()):
            if stone.until <= now:
                del self._gone[number]

    def _forget(self, number: int, reason: Gone, now: float) -> None:
        plate = self._live.pop(number, None)
        if plate is not None:
            self._gone[number] = Tombstone(reason, now + TOMBSTONE_KEEP_S)
            self.version += 1

    def _get(self, number: int, now: float) -> Nameplate:
        self.purge(now)
        plate = self._live.get(number)
        if plate is not None:
            return plate
        stone = self._gone.get(number)
        if stone is not None:
            text = {Gone.USED: "this code was already used",
                    Gone.FAILED: "a wrong code was tried on this nameplate; it is closed",
                    Gone.EXPIRED: "this code has expired",
                    Gone.CANCELLED: "this code was cancelled"}[stone.reason]
            raise MailboxError(410, text, stone.reason.value)
        raise MailboxError(404, "no such code (expired, used or never made)", "unknown")

    def allocate(self, ttl_s: float, now: float) -> tuple[int, str, float]:
        self.purge(now)
        if len(self._live) + len(self._gone) >= self.max_nameplates:
            raise MailboxError(503, "the mailbox is full; try again in a minute", "full")
        number = 1
        while number in self._live or number in self._gone:
            number += 1
        token = self._token()
        plate = Nameplate(number, now + ttl_s, {"A": token})
        self._live[number] = plate
        return number, token, plate.expires_at

    def claim(self, number: int, now: float) -> tuple[str, float]:
        plate = self._get(number, now)
        if "B" in plate.tokens:
            raise MailboxError(409, "this code was already used", Gone.USED.value)
        token = self._token()
        plate.tokens["B"] = token
        self.version += 1
        return token, plate.expires_at

    def post(self, number: int, token: str, phase: str, body: bytes, now: float) -> None:
        plate = self._get(number, now)
        side = plate.side_of(token)
        if phase not in PHASES:
            raise MailboxError(400, f"phase must be one of {', '.join(PHASES)}", "phase")
        if len(body) > MAX_MESSAGE_BYTES:
            raise MailboxError(413, f"a message has at most {MAX_MESSAGE_BYTES} bytes", "size")
        mine = plate.messages[side]
        if any(p == phase for p, _ in mine):
            raise MailboxError(409, f"side {side} already posted its {phase} message", "phase")
        if phase == "box" and not mine:
            raise MailboxError(409, "the pake message comes before the box", "phase")
        mine.append((phase, body))
        self.version += 1

    def fetch(self, number: int, token: str, after: int, now: float
              ) -> list[tuple[str, bytes]]:
        plate = self._get(number, now)
        side = plate.side_of(token)
        theirs = plate.messages["B" if side == "A" else "A"]
        out = theirs[max(0, after):]
        if any(p == "box" for p, _ in out):
            plate.fetched_box.add(side)
            if len(plate.fetched_box) == 2:  # the first complete exchange: forget it
                self._forget(number, Gone.USED, now)
        return out

    def release(self, number: int, token: str, failed: bool, now: float, *,
                cancelled: bool = False) -> None:
        stone = self._gone.get(number)
        if failed and stone is not None and stone.reason is Gone.USED:
            # both boxes were fetched, then a side found the MAC wrong: say so to latecomers
            # (tokens are gone with the messages, so anyone may only make this worse)
            self._gone[number] = Tombstone(Gone.FAILED, stone.until)
            self.version += 1
            return
        plate = self._get(number, now)
        plate.side_of(token)
        if cancelled:
            self._forget(number, Gone.CANCELLED, now)
        elif failed:
            self._forget(number, Gone.FAILED, now)
        elif len(plate.fetched_box) == 2 or "B" not in plate.tokens:
            self._forget(number, Gone.USED, now)


# -- aiohttp shell ------------------------------------------------------------


@dataclass(slots=True)
class Mailbox:
    store: MailboxStore
    allocate_limiter: RateLimiter
    claim_limiter: RateLimiter
    fetch_limiter: RateLimiter
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        """Wake every long poll (they re-check their own nameplate)."""
        self.changed.set()
        self.changed = asyncio.Event()


MAILBOX_KEY: web.AppKey[Mailbox] = web.AppKey("mailbox", Mailbox)
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _reply(obj: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(obj), status=status, content_type="application/json")


def _handler(fn: Callable[[web.Request, Mailbox], Awaitable[dict[str, Any]]]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        box = request.app[MAILBOX_KEY]
        version = box.store.version
        try:
            return _reply(await fn(request, box))
        except MailboxError as exc:
            resp = _reply({"error": exc.message, "reason": exc.reason}, exc.status)
            if exc.status == 429:
                resp.headers["Retry-After"] = "1"
            return resp
        finally:
            if box.store.version != version:
                box.bump()

    return handle


def _limit(limiter: RateLimiter, request: web.Request, what: str) -> None:
    retry_s = limiter.take(source_key(request.remote), time.monotonic())
    if retry_s > 0:
        raise MailboxError(429, f"too many {what} from this address; retry in {retry_s:.1f} s",
                           "rate")


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise MailboxError(413, f"request body over {MAX_REQUEST_BYTES} bytes", "size")
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await request.read()  # the app's client_max_size bounds what is buffered
    except TimeoutError:
        raise MailboxError(408, f"request body not received within {BODY_TIMEOUT_S:g} s",
                           "timeout") from None
    except web.HTTPRequestEntityTooLarge:
        raise MailboxError(413, f"request body over {MAX_REQUEST_BYTES} bytes", "size") from None
    if len(raw) > MAX_REQUEST_BYTES:
        raise MailboxError(413, f"request body over {MAX_REQUEST_BYTES} bytes", "size")
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise MailboxError(400, "request body is not valid JSON", "json") from None
    if not isinstance(obj, dict):
        raise MailboxError(400, "request body must be a JSON object", "json")
    return obj


def _nameplate(request: web.Request) -> int:
    text = request.match_info["nameplate"]
    if not text.isascii() or not text.isdigit() or len(text) > 6 or not 0 < int(text):
        raise MailboxError(400, f"a nameplate is a number 1-{MAX_NAMEPLATE}", "nameplate")
    return int(text)


def _token(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 2 * TOKEN_BYTES:
        raise MailboxError(403, "missing or malformed side token", "token")
    return value


def _b64(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_MESSAGE_BYTES:
        raise MailboxError(400, "body must be a base64 string", "body")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MailboxError(400, "body must be a base64 string", "body") from None


@_handler
async def handle_allocate(request: web.Request, box: Mailbox) -> dict[str, Any]:
    _limit(box.allocate_limiter, request, "pairing codes")
    body = await _body(request)
    ttl = body.get("ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not (
            MIN_TTL_S <= ttl <= MAX_TTL_S):
        raise MailboxError(400, f"ttl_s must be {MIN_TTL_S}-{MAX_TTL_S} seconds", "ttl")
    number, token, expires = box.store.allocate(float(ttl), time.time())
    return {"nameplate": number, "token": token, "expires_at": expires}


@_handler
async def handle_claim(request: web.Request, box: Mailbox) -> dict[str, Any]:
    _limit(box.claim_limiter, request, "pairing attempts")
    token, expires = box.store.claim(_nameplate(request), time.time())
    return {"token": token, "expires_at": expires}


@_handler
async def handle_post(request: web.Request, box: Mailbox) -> dict[str, Any]:
    number = _nameplate(request)
    body = await _body(request)
    phase = body.get("phase")
    if not isinstance(phase, str):
        raise MailboxError(400, "phase must be a string", "phase")
    box.store.post(number, _token(body.get("token")), phase, _b64(body.get("body")),
                   time.time())
    return {"ok": True}


@_handler
async def handle_fetch(request: web.Request, box: Mailbox) -> dict[str, Any]:
    _limit(box.fetch_limiter, request, "mailbox fetches")
    number = _nameplate(request)
    token = _token(request.headers.get("X-Pair-Token"))
    after_text, wait_text = request.query.get("after", "0"), request.query.get("wait", "0")
    if not after_text.isdigit() or len(after_text) > 2:
        raise MailboxError(400, "after must be a small integer", "after")
    try:
        wait_s = min(MAX_WAIT_S, max(0.0, float(wait_text)))
    except ValueError:
        raise MailboxError(400, "wait must be a number of seconds", "wait") from None
    deadline = time.monotonic() + wait_s
    while True:
        messages = box.store.fetch(number, token, int(after_text), time.time())
        remaining = deadline - time.monotonic()
        if messages or remaining <= 0:
            break
        changed = box.changed
        try:
            await asyncio.wait_for(changed.wait(), min(remaining, 1.0))  # 1 s: expiry checks
        except TimeoutError:
            pass
    return {"messages": [{"phase": p, "body": base64.b64encode(b).decode("ascii")}
                         for p, b in messages]}


@_handler
async def handle_release(request: web.Request, box: Mailbox) -> dict[str, Any]:
    number = _nameplate(request)
    body = await _body(request)
    outcome = body.get("outcome")
    if outcome not in ("ok", "failed", "cancelled"):
        raise MailboxError(400, "outcome must be 'ok', 'failed' or 'cancelled'", "outcome")
    box.store.release(number, _token(body.get("token")), outcome == "failed", time.time(),
                      cancelled=outcome == "cancelled")
    return {"ok": True}


def add_mailbox_routes(app: web.Application, *, store: MailboxStore | None = None,
                       claim_rate_per_s: float = CLAIM_RATE_PER_S,
                       claim_burst: int = CLAIM_BURST) -> None:
    """Mount the mailbox on an aiohttp app (the bootstrap server's ``create_app`` does)."""
    app[MAILBOX_KEY] = Mailbox(store if store is not None else MailboxStore(),
                               RateLimiter(ALLOCATE_RATE_PER_S, ALLOCATE_BURST),
                               RateLimiter(claim_rate_per_s, claim_burst),
                               RateLimiter(FETCH_RATE_PER_S, FETCH_BURST))
    app.router.add_post("/pair/allocate", handle_allocate)
    app.router.add_post("/pair/{nameplate}/claim", handle_claim)
    app.router.add_post("/pair/{nameplate}/post", handle_post)
    app.router.add_get("/pair/{nameplate}/fetch", handle_fetch)
    app.router.add_post("/pair/{nameplate}/release", handle_release)
