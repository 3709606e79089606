"""The bootstrap registration server: an aiohttp app over the SQLite registry.

HTTP API (JSON bodies, every error is ``{"error": "..."}`` with a 4xx status):

* ``POST /register`` ``{"device_id": ID}`` (legacy, the seed's contract) or
  ``{"device_id": PEER_ID, "record": CONTACT_RECORD_JSON}`` (p2pfs nodes).
  A device id that parses as a p2pfs peer id must come with a contact record
  signed by that peer (403 otherwise); a record older than the stored one is
  a replay (409). Answers ``{"message", "peers": [ids], "records": [...]}``:
  up to REGISTER_REPLY_PEERS_MAX online peers, the registrant itself last (as the
  seed did: ``["device_001", "device_002"]`` after device_002 registered), the
  others picked round-robin across client addresses; for a contact record also
  ``"observed": {"host", "port"}``, the source address the request came from
  (STUN-like; a client that does not know the field ignores it).
* ``GET /peers?limit=N&cursor=C``: online registrations, keyset-paged, in the
  store's fair order (each address's first id, then each address's second, ...).
* ``DELETE /register/<id>``: signed ``{"timestamp", "signature"}`` for a peer
  id, unsigned for a legacy id.
* ``GET /health``: ``{"status": "ok", "online": N}``.

Per client address (bootstrap.limits.source_key): registrations and listings
each spend a token bucket (429 with ``Retry-After`` when empty, checked before
the body is read), unsigned legacy ids are capped (429), and a connection that
does not deliver its headers within ``header_timeout_s`` or its body within
``body_timeout_s`` is closed. An address has ``concurrent_per_source`` requests
handled at once (SourceTurns; the rest wait in line), so a flood over many
connections does not queue ahead of other addresses' requests, and its turns start at
``pace_per_s`` after a short burst, so a burst of requests is spread over time instead
of filling the loop's turns back to back; a big listing
is read in slices that give the loop back, each slice's JSON items written by
SQLite itself (RegistryStore.page_items, ~20 % cheaper); a client that hangs up
ends its handler at once (no tarpitted handler sleeps on for nobody); and
``run`` freezes the startup heap out of the cyclic GC, whose full passes
otherwise stalled the loop 30-70 ms under a flood. An address whose buckets are
all empty (each request would be a 429), or that holds as many open connections as it
has tokens left, is reset at accept time, before aiohttp parses anything (``Admission``;
``_Listener``: one accept() and a close with SO_LINGER 0, no transport); an admitted
connection gets its transport at SETUP_PER_S per address after a short burst, and not
while the address has requests in line, so 64 connections opened at once are not parsed
in one loop turn. An address that goes on connecting anyway (BLOCK_AFTER_REFUSALS
refusals at accept within a second: a closed-loop flood) is dropped by the kernel for
BLOCK_S, in the listening sockets' filter (bootstrap.sockfilter), so its connection
attempts no longer cost the server's loop anything. A client's own faults (a malformed
request line, a hang-up mid-body) are logged as one DEBUG line, never as an ERROR traceback.

Database work runs inline on the event loop: registrations touch only the
store's in-memory state and are written behind in batched transactions every
50 ms; reads are single keyset queries well under a millisecond (measured by
scripts/bench_bootstrap.py). An executor hop would cost more than the query.
This module must not import the node daemon,
the DHT or the transports.
"""

from __future__ import annotations

import _socket
import asyncio
import base64
import binascii
import collections
import contextlib
import errno
import functools
import gc
import json
import logging
import math
import re
import select
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bootstrap import (
    DEFAULT_PAGE_LIMIT,
    DEFAULT_PORT,
    DEFAULT_TTL_S,
    MAX_BODY_BYTES,
    MAX_DEVICE_ID_LEN,
    MAX_PAGE_LIMIT,
    UNREGISTER_WINDOW_S,
    sockfilter,
    unregister_message,
)
from bootstrap.limits import (
    ADMIT_MAX_QUEUED,
    LIST_PAGE_ROWS,
    PACE_BURST,
    SETUP_BURST,
    SETUP_PER_S,
    TARPIT_DELAY_S,
    TARPIT_MAX_WAITING,
    Blocklist,
    RateLimiter,
    ServerLimits,
    admit_connection,
    source_key,
)
from bootstrap.store import (
    FLUSH_INTERVAL_S,
    FLUSH_MAX_ROWS,
    MAX_REGISTRATIONS,
    RegisterOutcome,
    RegistryFull,
    RegistryStore,
    StaleRegistration,
    TooManyLegacyIds,
    UnregisterOutcome,
)
from node.contact import MAX_CLOCK_SKEW_S, ContactRecord, json_extensions
from node.errors import IdentityError, P2PError, ProtocolError, bind_errors, describe_os_error
from node.identity import GROUP_LEN, PEER_ID_TEXT_LEN, PeerId, normalize_id_text
from node.listen import listening_sockets

log = logging.getLogger("p2pfs.bootstrap")
# aiohttp's own connection-level log (bad request lines and the like) goes here
http_log = logging.getLogger("p2pfs.bootstrap.http")

# how many peers a registration answer lists (the registrant included): a Kademlia
# bucket's worth (k = 20) is plenty to join the DHT, and keeps the answer small
# (~8 KiB with records) so registrations stay cheap; GET /peers pages the rest
REGISTER_REPLY_PEERS_MAX = 20
# after answering a request whose body was not read (429, 413), read and drop the
# rest of it this long before closing, instead of aiohttp's 10 s
LINGERING_TIME_S = 1.0
PURGE_INTERVAL_MAX_S = 60.0
PURGE_INTERVAL_MIN_S = 0.5
MAX_CURSOR_LEN = 256
SHUTDOWN_TIMEOUT_S = 2.0
DB_FILE_NAME = "bootstrap.sqlite3"

MSG_REGISTERED = "Device registered successfully."
MSG_REFRESHED = "Device already registered."

STORE_KEY: web.AppKey[RegistryStore] = web.AppKey("store", RegistryStore)
TTL_KEY: web.AppKey[float] = web.AppKey("ttl_s", float)
LIMITS_KEY: web.AppKey[ServerLimits] = web.AppKey("limits", ServerLimits)
REGISTER_LIMITER_KEY: web.AppKey[RateLimiter] = web.AppKey("register_limiter", RateLimiter)
LIST_LIMITER_KEY: web.AppKey[RateLimiter] = web.AppKey("list_limiter", RateLimiter)
# requests refused and waiting out TARPIT_DELAY_S before their 429 goes out
TARPIT_KEY: web.AppKey[list[int]] = web.AppKey("tarpit_waiting", list)

_B32_RE = re.compile(r"^[A-Z2-7]+$")
_CURSOR_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_JSON_TYPE = "application/json"


class ApiError(Exception):
    """An answer to the client: HTTP status and a one-line reason.

    ``retry_after_s`` adds a Retry-After header (429); ``close`` ends the
    connection after the answer (the request was not read to its end).
    """

    def __init__(self, status: int, message: str, *, retry_after_s: float | None = None,
                 close: bool = False, delay_s: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.close = close
        self.delay_s = delay_s


class ClientGone(Exception):
    """The client hung up before its request was read: nobody to answer, nothing to log."""


def _json_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type=_JSON_TYPE)


def _error(status: int, message: str) -> web.Response:
    return _json_response(json.dumps({"error": message}), status)


def _rate_check(request: web.Request, key: web.AppKey[RateLimiter], what: str) -> str:
    """Spend one token of the client's bucket; ApiError 429 when it is empty. Returns the
    client's source key."""
    source = source_key(request.remote)
    retry_s = request.app[key].take(source, time.monotonic())
    if retry_s > 0:
        raise ApiError(429, f"too many {what} from this address; retry in "
                            f"{retry_s:.1f} s", retry_after_s=retry_s, delay_s=TARPIT_DELAY_S)
    return source


class SourceTurns:
    """At most ``per_source`` requests of one source are handled at once; the rest wait.

    The event loop runs every ready handler in turn, so without this a source with
    64 connections puts 64 handlers in front of an honest client's one, and the honest
    answer waits for all of them. Here a source's extra requests wait on a future (FIFO,
    cheap), so an honest request queues behind at most ``per_source`` handlers per other
    source. ``waiting_per_source`` bounds the queue; beyond it ``acquire`` raises ApiError
    429 at once. ``per_source == 0`` turns the turns off.

    A source's turns also start at most ``pace_per_s`` a second after ``pace_burst`` at
    once (bootstrap.limits.PACE_PER_S; 0 = unpaced): a turn that comes early waits, holding
    its slot, until it is due, so a source's burst is spread over time.
    """

    def __init__(self, per_source: int, waiting_per_source: int, *,
                 pace_per_s: float = 0.0, pace_burst: int = PACE_BURST) -> None:
        self.per_source = per_source
        self.waiting_per_source = waiting_per_source
        self._active: dict[str, int] = {}
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._pace = RateLimiter(pace_per_s, pace_burst)
        # called with a source whose line just got shorter (Admission.set_up_wait)
        self.line_moved: Callable[[str], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.per_source > 0

    def active(self, source: str) -> int:
        return self._active.get(source, 0)

    def waiting(self, source: str) -> int:
        return len(self._waiting.get(source, ()))

    async def acquire(self, source: str) -> None:
        active = self._active.get(source, 0)
        if active < self.per_source:
            self._active[source] = active + 1
        else:
            await self._wait_for_slot(source)
        if self._pace.enabled:
            try:
                while (early_s := self._pace.take(source, time.monotonic())) > 0:
                    # at least PACE_MIN_SLEEP_S: a remainder under uvloop's timer
                    # resolution is not waited out in a row of near-zero sleeps
                    await asyncio.sleep(max(early_s, PACE_MIN_SLEEP_S))
            except asyncio.CancelledError:
                self.release(source)
                raise

    async def _wait_for_slot(self, source: str) -> None:
        queue = self._waiting.setdefault(source, collections.deque())
        if len(queue) >= self.waiting_per_source:
            raise ApiError(429, "too many requests in flight from this address",
                           retry_after_s=1.0)
        fut = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            await fut  # release() hands its slot over: _active is unchanged
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(source)  # the slot was handed to us as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    queue.remove(fut)
                if not queue:
                    self._waiting.pop(source, None)
                if self.line_moved is not None:
                    self.line_moved(source)
            raise

    def release(self, source: str) -> None:
        queue = self._waiting.get(source)
        while queue:
            fut = queue.popleft()
            if not queue:
                del self._waiting[source]
            if not fut.done():
                fut.set_result(None)
                if self.line_moved is not None:
                    self.line_moved(source)
                return
        active = self._active.get(source, 0) - 1
        if active > 0:
            self._active[source] = active
        else:
            self._active.pop(source, None)


class _ClientFaultFilter(logging.Filter):
    """Turn aiohttp's ERROR traceback for a client's own fault into one DEBUG line.

    A malformed request line, an oversize header or a reset connection is the
    client's business: on a public server a traceback per bad request would let
    anyone fill the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, ConnectionError)):
            reason = getattr(exc, "message", "") or exc.__class__.__name__
            log.debug("%s: %s", record.getMessage(), str(reason).splitlines()[0][:200]
                      if str(reason) else exc.__class__.__name__)
            return False
        return True


http_log.addFilter(_ClientFaultFilter())
TURNS_KEY: web.AppKey[SourceTurns] = web.AppKey("turns", SourceTurns)


# -- input validation -------------------------------------------------------


# parsing a peer id costs a checksum (blake2b through pynacl): remember recent ones,
# since the steady state is the same nodes refreshing every minute
_PEER_ID_CACHE_MAX = 65536
_peer_id_cache: dict[str, PeerId] = {}


def _parse_peer_id(compact: str) -> PeerId:
    peer_id = _peer_id_cache.get(compact)
    if peer_id is None:
        peer_id = PeerId.parse(compact)  # IdentityError when the checksum is wrong
        if len(_peer_id_cache) >= _PEER_ID_CACHE_MAX:
            _peer_id_cache.clear()
        _peer_id_cache[compact] = peer_id
    return peer_id


def parse_device_id(value: Any) -> tuple[str, PeerId | None]:
    """Validate a device id; a p2pfs peer id comes back canonical with its PeerId."""
    if not isinstance(value, str):
        raise ApiError(400, "device_id must be a string")
    if not 0 < len(value) <= MAX_DEVICE_ID_LEN:
        raise ApiError(400, f"device_id must have 1-{MAX_DEVICE_ID_LEN} characters")
    if not value.isprintable() or value != value.strip():
        raise ApiError(400, "device_id must be printable text without surrounding spaces")
    compact = normalize_id_text(value)
    if len(compact) == PEER_ID_TEXT_LEN and _B32_RE.match(compact):
        try:
            peer_id = _parse_peer_id(compact)
        except IdentityError as exc:
            # looks like a peer id but is not one: refuse rather than register it as legacy
            raise ApiError(400, f"device_id: {exc}") from None
        # str(PeerId) would recompute the checksum; the grouping of the checked text is equal
        return "-".join(compact[i:i + GROUP_LEN] for i in range(0, len(compact), GROUP_LEN)), \
            peer_id
    return value, None


def record_from_json(raw: Any, peer_id: PeerId, peer_text: str) -> ContactRecord:
    """ContactRecord.from_json for a record that must belong to ``peer_id``.

    Same checks (ContactRecord.from_wire does the validation) but the record's
    peer id is compared as text with the already-parsed device id instead of
    being parsed again. Raises ApiError.
    """
    if not isinstance(raw, dict):
        raise ApiError(400, "bad contact record: must be a JSON object")
    try:
        text = raw["peer_id"]
        if not isinstance(text, str) or len(text) > 2 * PEER_ID_TEXT_LEN:
            raise ApiError(400, "bad contact record: peer_id must be a peer id")
        if normalize_id_text(text) != peer_text.replace("-", ""):
            raise ApiError(403, "the contact record belongs to another peer than device_id")
        ports = raw["ports"]
        if not isinstance(ports, dict):
            raise ApiError(400, "bad contact record: ports must be an object")
        sig = base64.b64decode(raw["signature"], validate=True)
        wire = [peer_id.key, raw["name"], raw["hosts"], sorted(ports.items()),
                raw["seq"], raw["timestamp"], raw["expires"], sig, *json_extensions(raw)]
        return ContactRecord.from_wire(wire)
    except KeyError as exc:
        raise ApiError(400, f"bad contact record: missing field {exc}") from None
    except (ProtocolError, IdentityError, ValueError, TypeError, AttributeError) as exc:
        raise ApiError(400, f"bad contact record: {exc}") from None


def record_json_text(record: ContactRecord, peer_text: str) -> str:
    """Compact ``record.to_json()`` text, reusing the canonical peer id text."""
    return json.dumps({
        "peer_id": peer_text,
        "name": record.name,
        "hosts": list(record.hosts),
        "ports": dict(sorted(record.ports.items())),
        "seq": record.seq,
        "timestamp": record.timestamp,
        "expires": record.expires,
        "signature": base64.b64encode(record.signature).decode("ascii"),
        **record.extensions(),
    }, separators=(",", ":"))


def parse_record(raw: Any, peer_id: PeerId, now: float, peer_text: str | None = None
                 ) -> ContactRecord:
    """Decode and verify a contact record sent for ``peer_id``; ApiError on any fault."""
    record = record_from_json(raw, peer_id, peer_text or str(peer_id))
    try:
        signed = record.signed_bytes()
    except (ValueError, TypeError) as exc:  # e.g. lone surrogates in a name
        raise ApiError(400, f"bad contact record: {exc}") from None
    if not peer_id.verify(signed, record.signature):
        raise ApiError(403, "contact record signature is invalid")
    # the rest of ContactRecord.verify(), without checking the signature a second time
    if record.timestamp > now + MAX_CLOCK_SKEW_S:
        raise ApiError(400, "contact record is dated in the future")
    if record.is_expired(now):
        raise ApiError(400, f"contact record for {peer_id.short} has expired")
    return record


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", close=True)
    timeout_s = request.app[LIMITS_KEY].body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            body = await request.read()  # aiohttp enforces client_max_size while reading
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout_s:g} s",
                       close=True) from None
    except ConnectionError:  # the client hung up mid-body
        raise ClientGone() from None
    except web.RequestPayloadError as exc:  # e.g. broken chunked encoding
        raise ApiError(400, f"bad request body: {exc}", close=True) from None
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    if not body:
        raise ApiError(400, "request body must be a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "request body is not valid JSON") from None


def _encode_cursor(slot: int, device_id: str) -> str:
    raw = f"{slot}:{device_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    if len(cursor) > MAX_CURSOR_LEN:
        raise ApiError(400, "cursor too long")
    bad = ApiError(400, "cursor is not one this server handed out")
    if not _CURSOR_RE.match(cursor):
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        slot_text, sep, after = raw.decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        raise bad from None
    if (not sep or not slot_text.isascii() or not slot_text.isdigit() or len(slot_text) > 12
            or not 0 < len(after) <= MAX_DEVICE_ID_LEN or not after.isprintable()):
        raise bad
    return int(slot_text), after


def _parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE_LIMIT
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise ApiError(400, "limit must be a positive integer")
    limit = int(text)
    if limit < 1:
        raise ApiError(400, "limit must be a positive integer")
    return min(limit, MAX_PAGE_LIMIT)


# -- handlers ---------------------------------------------------------------


def _observed(request: web.Request) -> dict[str, Any] | None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None  # a Unix socket or a closed transport: nothing to report
    return {"host": str(peer[0]), "port": int(peer[1])}


async def handle_register(request: web.Request) -> web.Response:
    source = _rate_check(request, REGISTER_LIMITER_KEY, "registrations")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if "device_id" not in body:
        raise ApiError(400, "missing field device_id")
    device_id, peer_id = parse_device_id(body["device_id"])
    raw_record = body.get("record")
    store, ttl_s = request.app[STORE_KEY], request.app[TTL_KEY]
    now = time.time()
    if peer_id is None:
        if raw_record is not None:
            raise ApiError(400, "a contact record needs the peer id it belongs to as device_id")
        try:
            outcome = store.register(device_id, None, now=now, expires_at=now + ttl_s,
                                     source=source)
        except TooManyLegacyIds as exc:
            raise ApiError(429, str(exc), retry_after_s=ttl_s) from None
        record_json = None
    else:
        if raw_record is None:
            raise ApiError(403, "a p2pfs peer id must come with its signed contact record")
        record = parse_record(raw_record, peer_id, now, device_id)
        record_json = record_json_text(record, device_id)
        try:
            outcome = store.register(device_id, record_json, now=now,
                                     expires_at=min(now + ttl_s, float(record.expires)),
                                     seq=record.seq, timestamp=record.timestamp,
                                     source=source)
        except StaleRegistration as exc:
            raise ApiError(409, str(exc)) from None
    if store.pending_rows >= FLUSH_MAX_ROWS:
        store.flush()
    log.debug("register %s: %s", device_id, outcome.value)
    # the seed's contract: the connected peers, the registrant included (last); a node
    # drops its own entry (bootstrap.client does)
    others = store.others(device_id, REGISTER_REPLY_PEERS_MAX - 1, now=now)
    listed = [*reversed(others), (device_id, record_json)]
    message = MSG_REFRESHED if outcome is RegisterOutcome.REFRESHED else MSG_REGISTERED
    parts = ['{"message":', json.dumps(message), ',"peers":', json.dumps([d for d, _ in listed])]
    observed = _observed(request) if record_json is not None else None
    if observed is not None:
        # p2pfs nodes only (a legacy answer stays exactly the seed's). Like STUN: the
        # source address of this request, so a node behind a NAT learns its public
        # address (the port is that of this HTTP connection)
        parts += [',"observed":', json.dumps(observed, separators=(",", ":"))]
    if record_json is not None:
        # stored records are our own canonical JSON: splice them without re-encoding
        parts += [',"records":[', ",".join(r for _, r in listed if r is not None), "]"]
    parts.append("}")
    return _json_response("".join(parts))


async def handle_peers(request: web.Request) -> web.Response:
    _rate_check(request, LIST_LIMITER_KEY, "listings")
    limit = _parse_limit(request.query.get("limit"))
    cursor = request.query.get("cursor")
    after = _decode_cursor(cursor) if cursor else None
    store = request.app[STORE_KEY]
    now = time.time()
    # a big page is read and encoded in slices, giving the loop back between them: a
    # 1,000-row page costs ~10 ms, and an honest request should wait for one slice of it,
    # not all of it (each slice is its own keyset query, as separate pages would be)
    items: list[str] = []
    last: tuple[int, str] | None = None
    while len(items) < limit:
        want = min(LIST_PAGE_ROWS, limit - len(items))
        rows = store.page_items(want, after, now=now)
        items.extend(text for _slot, _device_id, text in rows)
        if len(rows) < want:
            break
        last = after = (rows[-1][0], rows[-1][1])
        if len(items) < limit:
            await asyncio.sleep(0)
    # the first page of rows was paid for by _rate_check; a big answer costs more
    extra_pages = (len(items) - 1) // LIST_PAGE_ROWS
    if extra_pages > 0:
        request.app[LIST_LIMITER_KEY].charge(source_key(request.remote), extra_pages,
                                              time.monotonic())
    next_cursor = (json.dumps(_encode_cursor(*last))
                   if last is not None and len(items) == limit else "null")
    return _json_response(f'{{"peers":[{",".join(items)}],"next_cursor":{next_cursor}}}')


async def handle_unregister(request: web.Request) -> web.Response:
    _rate_check(request, REGISTER_LIMITER_KEY, "registrations")
    device_id, peer_id = parse_device_id(request.match_info["device_id"])
    store = request.app[STORE_KEY]
    now = time.time()
    if peer_id is None:
        outcome = store.unregister(device_id, now=now)
    else:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        timestamp, signature = body.get("timestamp"), body.get("signature")
        if type(timestamp) is not int or not 0 <= timestamp < 2**40:
            raise ApiError(400, "timestamp must be an integer (unix seconds)")
        if not isinstance(signature, str) or len(signature) > 128:
            raise ApiError(400, "signature must be a base64 string")
        try:
            sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "signature must be a base64 string") from None
        if store.get(device_id, now=now) is None:
            raise ApiError(404, "no such registration")
        if abs(timestamp - now) > UNREGISTER_WINDOW_S:
            raise ApiError(403, f"timestamp is more than {UNREGISTER_WINDOW_S} s from server time")
        if len(sig) != 64 or not peer_id.verify(unregister_message(peer_id, timestamp), sig):
            raise ApiError(403, "unregister signature is invalid")
        try:
            outcome = store.unregister(device_id, now=now, signed_timestamp=timestamp)
        except StaleRegistration as exc:
            raise ApiError(409, str(exc)) from None
    if outcome is UnregisterOutcome.UNKNOWN:
        raise ApiError(404, "no such registration")
    log.debug("unregister %s", device_id)
    return _json_response(json.dumps({"message": "Device unregistered."}))


async def handle_health(request: web.Request) -> web.Response:
    online = request.app[STORE_KEY].count_online(now=time.time())
    return _json_response(json.dumps({"status": "ok", "online": online}))


# -- app wiring ---------------------------------------------------------------


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure leaves as a JSON ``{"error"}``; nothing escapes as a 500 page.

    A registry handler runs inside the client's turn (``in_turn``); a refusal's tarpit
    delay is waited out here, after the turn was given back."""
    try:
        return await handler(request)
    except ApiError as exc:
        waiting = request.app[TARPIT_KEY]
        if exc.delay_s > 0 and waiting[0] < TARPIT_MAX_WAITING:
            waiting[0] += 1
            try:
                await asyncio.sleep(exc.delay_s)
            finally:
                waiting[0] -= 1
        resp = _error(exc.status, exc.message)
        if exc.retry_after_s is not None:
            resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        if exc.close:
            resp.force_close()
        return resp
    except ClientGone:
        log.debug("client %s hung up during %s %s", request.remote, request.method,
                  request.path)
        resp = _error(400, "connection closed by the client")
        resp.force_close()
        return resp
    except RegistryFull as exc:
        return _error(503, str(exc))
    except web.HTTPException as exc:  # 404/405 from the router, 413 from client_max_size
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except P2PError as exc:
        return _error(400, str(exc))
    except asyncio.CancelledError:
        # handler_cancellation: aiohttp cancels the handler of a client that hung up
        log.debug("client %s hung up during %s %s", request.remote, request.method,
                  request.path)
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, "internal server error")


class Admission:
    """Which new connections are accepted: a source is reset at accept time, before aiohttp
    parses anything, while every bucket it could spend is empty (each of its requests would
    only be answered 429; the 429s before, with Retry-After, told it when to come back),
    or while it holds as many open connections as it has tokens left
    (bootstrap.limits.admit_connection): a flood's extra connections would each carry one
    parsed request that is answered 429, and is dropped when the flooder hangs up. An
    admitted connection gets its transport when ``set_up_wait`` says so (SETUP_PER_S).

    Open connections are counted per source from accept to aiohttp's ``connection_lost``;
    only open connections are remembered (bounded by the listen backlog and the timeouts).
    """

    def __init__(self, app: web.Application) -> None:
        self._limiters = (app[REGISTER_LIMITER_KEY], app[LIST_LIMITER_KEY])
        self._turns = app[TURNS_KEY]
        self._enabled = all(lim.enabled for lim in self._limiters)
        from bootstrap.stats import STATS_KEY

        self._stats = app.get(STATS_KEY)
        self._open: dict[str, int] = {}
        self._source_of: dict[object, str] = {}
        limits = app[LIMITS_KEY]
        # who keeps flooding after being refused here is dropped in the kernel
        # (_Listener, bootstrap.sockfilter); only while the limits that refuse are on
        self.blocklist = Blocklist(limits.block_after_refusals if self._enabled else 0,
                                   block_s=limits.block_s)
        self._setups = RateLimiter(SETUP_PER_S if self._enabled else 0.0, SETUP_BURST)
        self.header_timeout_s = limits.header_timeout_s

    @property
    def stats(self) -> Any:
        return self._stats

    def open_connections(self, source: str) -> int:
        return self._open.get(source, 0)

    def admit(self, source: str) -> bool:
        """Whether to accept a new connection of ``source``. An admitted one counts as open
        from here on, so the many connections a flood gets accepted in one loop turn are
        counted as they are admitted, not later when aiohttp has made their handlers."""
        admitted = True
        if self._enabled:
            now = time.monotonic()
            register, listing = self._limiters
            tokens = max(register.tokens(source, now), listing.tokens(source, now))
            admitted = admit_connection(tokens, self._open.get(source, 0))
        if self._stats is not None:
            self._stats.count_accept(source, not admitted)
        if admitted:
            self._open[source] = self._open.get(source, 0) + 1
        return admitted

    def set_up_wait(self, source: str) -> float | None:
        """Whether an admitted connection of ``source`` gets its transport now (0.0: its
        token is spent), in so many seconds (its SETUP_PER_S bucket is empty), or once its
        line is shorter (None: ADMIT_MAX_QUEUED of its requests wait for their turns;
        SourceTurns.line_moved tells when that changes)."""
        if not self._setups.enabled:
            return 0.0
        if self._turns.waiting(source) >= ADMIT_MAX_QUEUED:
            return None
        return self._setups.take(source, time.monotonic())

    def on_line_moved(self, callback: Callable[[str], None]) -> None:
        self._turns.line_moved = callback

    def drain(self, source: str, for_s: float) -> None:
        """``source`` is blocked in the kernel for ``for_s``: it earns no tokens meanwhile
        (RateLimiter.suspend), so it comes back with empty buckets, is refused at accept
        again and soon blocked again, instead of spending a full burst of requests on the
        server after each block."""
        until = time.monotonic() + for_s
        for limiter in self._limiters:
            limiter.suspend(source, until)

    def opened(self, handler: object, source: str) -> None:
        """aiohttp made ``handler`` for a connection ``admit`` counted: it is closed() by it."""
        self._source_of[handler] = source

    def abandon(self, source: str) -> None:
        """An admitted connection that never reached aiohttp (reset before its transport)."""
        self._drop(source)

    def closed(self, handler: object) -> None:
        source = self._source_of.pop(handler, None)
        if source is not None:
            self._drop(source)

    def _drop(self, source: str) -> None:
        left = self._open.get(source, 0) - 1
        if left > 0:
            self._open[source] = left
        else:
            self._open.pop(source, None)

    def watch(self, server: web.Server) -> None:
        """Count every connection aiohttp opens and closes (its handler tells its Server)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            # the handler's source was tied to it when it was made (_Listener._connect):
            # the transport's peername is None for a client that reset meanwhile
            made(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            self.closed(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign,assignment]
        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]


ADMISSION_KEY: web.AppKey[Admission] = web.AppKey("admission", Admission)


# RST instead of FIN on close: a refused connection leaves no TIME_WAIT behind and the
# kernel sends nothing more for it
_LINGER_RESET = struct.pack("ii", 1, 0)
# connections accepted per readiness event of the listening socket (asyncio's own accept
# loop takes up to the backlog at once)
ACCEPT_BATCH = 128
# the shortest a paced turn or a deferred connection's timer waits: uvloop's timers have
# 1 ms resolution, so a shorter wait could come back at once and be tried again and again
PACE_MIN_SLEEP_S = 0.001
# at most one log line a second for addresses blocked in the kernel (the rest are counted)
BLOCK_LOG_INTERVAL_S = 1.0
# after EMFILE/ENFILE/ENOBUFS, stop accepting this long (as asyncio's accept loop does)
ACCEPT_RETRY_DELAY_S = 1.0


def _reset(conn: _socket.socket) -> None:
    """Close an accepted connection with a reset (SO_LINGER 0): no TIME_WAIT is left
    and the kernel sends nothing more for it."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    conn.close()


# a connection whose client has closed (or shut down its sending side) or reset it
_HUNG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client of an accepted, unread connection has hung up already, even
    with its request still unread in the socket (one poll(), ~1 us)."""
    poller = select.poll()
    poller.register(conn.fileno(), _HUNG_UP)
    return bool(poller.poll(0))


class _Listener:
    """The listening sockets of an _AdmittingSite and its own accept loop.

    Each ready listening socket is drained with ``accept()`` (up to ACCEPT_BATCH at a
    time); a connection Admission refuses is closed at once with SO_LINGER 0 (a reset),
    before any transport, protocol, HTTP parsing or answer exists for it: what a refused
    flood connection costs is one accept() and one close(). An admitted one becomes
    aiohttp's request handler through ``loop.connect_accepted_socket``, at once or, when
    ``Admission.set_up_wait`` says its source has had enough for now, a few milliseconds
    later, in the order its source's connections came (SETUP_PER_S). Quacks like the
    asyncio.Server aiohttp's runner expects of a site (``sockets``, ``close``).
    """

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], asyncio.Protocol],
                 admission: Admission) -> None:
        self.sockets = sockets
        self._factory = factory
        self._admission = admission
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False
        blocklist = admission.blocklist
        self._blocklist = blocklist if blocklist.enabled and sockfilter.supported() else None
        self._unblock: asyncio.TimerHandle | None = None
        self._block_logged_at = -math.inf
        self._blocks_unlogged = 0
        self._log_later: asyncio.TimerHandle | None = None
        # per listening socket (by index): the sources its filter drops now
        self._installed: dict[int, tuple[str, ...]] = {}
        # per source: admitted connections waiting for their transport (set_up_wait), FIFO,
        # each with the monotonic time it is reset at; the timer that looks again, and
        # the sources looked at again at the next loop turn (their line moved)
        self._deferred: dict[str, collections.deque[tuple[socket.socket, float]]] = {}
        self._wake: dict[str, asyncio.TimerHandle] = {}
        self._soon: set[str] = set()
        admission.on_line_moved(self._line_moved)
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        admission = self._admission
        for _ in range(ACCEPT_BATCH):
            try:
                # the C-level accept: (fd, address), without socket.accept()'s Python
                # socket object and enum conversions, which a refused connection never needs
                fd, addr = listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections for %g s: %s",
                                ACCEPT_RETRY_DELAY_S, describe_os_error(exc))
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume, listener)
                return  # ECONNABORTED and the like: that client is gone already
            source = source_key(addr[0]) if isinstance(addr, tuple) else ""
            if source and not admission.admit(source):
                self._refuse(_socket.socket(fileno=fd), source)
                continue
            conn = socket.socket(listener.family, listener.type, listener.proto, fileno=fd)
            conn.setblocking(False)
            if not source:
                self._start(conn, source)
                continue
            queue = self._deferred.get(source)
            if queue is not None:  # after those waiting already (FIFO)
                queue.append((conn, time.monotonic() + admission.header_timeout_s))
                continue
            wait_s = admission.set_up_wait(source)
            if wait_s == 0.0:
                self._start(conn, source)
                continue
            deadline = time.monotonic() + admission.header_timeout_s
            self._deferred[source] = collections.deque([(conn, deadline)])
            self._arm(source, wait_s, deadline)

    def _refuse(self, conn: _socket.socket, source: str) -> None:
        """Reset a connection; it counts towards the source's kernel block."""
        _reset(conn)
        blocklist = self._blocklist
        if blocklist is not None and blocklist.refused(source, time.monotonic()):
            self._install_blocks(source)

    def _start(self, conn: socket.socket, source: str) -> None:
        task = self._loop.create_task(self._connect(conn, source))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _arm(self, source: str, wait_s: float | None, deadline: float) -> None:
        """Look at ``source``'s deferred connections again when its setup token is back
        (``wait_s``) or its oldest one is due to be reset; a line that moves
        (_line_moved) looks sooner."""
        due_s = deadline - time.monotonic()
        if wait_s is not None:
            due_s = min(due_s, wait_s)
        self._wake[source] = self._loop.call_later(max(due_s, PACE_MIN_SLEEP_S),
                                                   self._set_up_deferred, source)

    def _line_moved(self, source: str) -> None:
        if source in self._deferred and source not in self._soon and not self._closed:
            self._soon.add(source)
            self._loop.call_soon(self._set_up_deferred, source)

    def _set_up_deferred(self, source: str) -> None:
        """Give ``source``'s waiting connections their transports, oldest first, as
        Admission allows; reset those that waited as long as headers may take."""
        self._soon.discard(source)
        timer = self._wake.pop(source, None)
        if timer is not None:
            timer.cancel()
        queue = self._deferred.get(source)
        if not queue:
            return
        now = time.monotonic()
        while queue and queue[0][1] <= now:
            _reset(queue.popleft()[0])
            self._admission.abandon(source)
        wait_s: float | None = 0.0
        while queue:
            conn = queue[0][0]
            if _hung_up(conn):
                # its client gave up waiting (a flood's patience is short): nothing to
                # read for anybody, and as good as a refusal for the kernel block
                queue.popleft()
                self._admission.abandon(source)
                self._refuse(conn, source)
                if self._deferred.get(source) is not queue:
                    return  # that blocked the source: its other connections are gone too
                continue
            wait_s = self._admission.set_up_wait(source)
            if wait_s != 0.0:
                break
            self._start(queue.popleft()[0], source)
        if queue:
            self._arm(source, wait_s, queue[0][1])
        else:
            del self._deferred[source]

    def _drop_deferred(self, source: str) -> None:
        timer = self._wake.pop(source, None)
        if timer is not None:
            timer.cancel()
        queue = self._deferred.pop(source, None)
        while queue:
            _reset(queue.popleft()[0])
            self._admission.abandon(source)

    def _install_blocks(self, newly: str | None = None) -> None:
        """Put the blocklist into the filter of each listening socket whose family's part
        of it changed, and set the timer for the next block to end. When the kernel has
        no room for the filter (ENOMEM: net.core.optmem_max), the blocks that end soonest
        are given up until it fits; any other refusal turns blocking off (the server goes
        on refusing at accept)."""
        blocklist = self._blocklist
        if blocklist is None or self._closed:
            return
        while True:
            blocked = blocklist.blocked()
            try:
                for i, sock in enumerate(self.sockets):
                    mine = sockfilter.sources_of(sock.family, blocked)
                    if self._installed.get(i, ()) != mine:
                        # unknown until it succeeds (a failed attach may have detached)
                        self._installed.pop(i, None)
                        sockfilter.block(sock, mine)
                        self._installed[i] = mine
                break
            except OSError as exc:
                if exc.errno == errno.ENOMEM and len(blocked) > 1:
                    log.warning("the kernel has no room for %d blocked addresses (%s); "
                                "keeping the %d that end last", len(blocked),
                                describe_os_error(exc), len(blocked) // 2)
                    blocklist.shrink(len(blocked) // 2)
                    continue
                self._give_up_blocking(describe_os_error(exc))
                return
            except ValueError as exc:
                self._give_up_blocking(str(exc))
                return
        if newly is not None and newly in blocklist:
            self._admission.drain(newly, blocklist.block_s)
            self._drop_deferred(newly)  # a flood's connections: not worth a transport
            self._log_block(newly, blocklist)
        self._arm_unblock()

    def _give_up_blocking(self, why: str) -> None:
        log.warning("cannot drop flooding addresses in the kernel (%s); they are refused "
                    "at accept instead", why)
        if self._blocklist is not None:
            self._blocklist.disable()
        self._blocklist = None
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sockfilter.detach(sock)
        self._installed.clear()

    def _arm_unblock(self) -> None:
        if self._unblock is not None:
            self._unblock.cancel()
            self._unblock = None
        due = None if self._blocklist is None else self._blocklist.next_expiry()
        if due is not None and not self._closed:
            self._unblock = self._loop.call_later(max(0.0, due - time.monotonic()),
                                                  self._expire_blocks)

    def _expire_blocks(self) -> None:
        self._unblock = None
        if self._blocklist is None:
            return
        if self._blocklist.expire(time.monotonic()):
            self._install_blocks()
        else:  # woken a little early (uvloop's timers may be): look again when due
            self._arm_unblock()

    def _log_block(self, source: str, blocklist: Blocklist) -> None:
        stats = self._admission.stats
        if stats is not None:
            stats.count_block(source)
        now = time.monotonic()
        wait_s = self._block_logged_at + BLOCK_LOG_INTERVAL_S - now
        if wait_s > 0:  # said in one line later
            self._blocks_unlogged += 1
            if self._log_later is None:
                self._log_later = self._loop.call_later(wait_s, self._log_unlogged)
            return
        self._block_logged_at = now
        log.warning("%s went on connecting after its 429s: %d connections refused at "
                    "accept (or dropped by it unanswered) within %g s; its connection "
                    "attempts are dropped in the kernel for %g s", source,
                    blocklist.after_refusals, blocklist.window_s, blocklist.block_s)

    def _log_unlogged(self) -> None:
        self._log_later = None
        if self._blocks_unlogged:
            log.warning("%d more addresses went on connecting after their 429s and are "
                        "dropped in the kernel for a while", self._blocks_unlogged)
            self._blocks_unlogged = 0
            self._block_logged_at = time.monotonic()

    def _resume(self, listener: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def _connect(self, conn: socket.socket, source: str) -> None:
        made: list[asyncio.Protocol] = []

        def factory() -> asyncio.Protocol:
            # the source admit() counted is tied to the handler as it is made, from the
            # accepted address (never re-read from the transport), so its close frees it
            handler = self._factory()
            if source:
                self._admission.opened(handler, source)
            made.append(handler)
            return handler

        try:
            await self._loop.connect_accepted_socket(factory, sock=conn)
        except (OSError, asyncio.CancelledError) as exc:
            # the client reset it before its transport existed, or the site is stopping
            log.debug("accepted connection lost: %s", exc)
            conn.close()
            if made:
                self._admission.closed(made[0])  # idempotent with aiohttp's own close
            elif source:
                self._admission.abandon(source)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._unblock, self._log_later):
            if timer is not None:
                timer.cancel()
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for source in list(self._deferred):
            self._drop_deferred(source)  # cancels its timer too (only a line has one)
        for task in self._pending:
            task.cancel()

    async def wait_closed(self) -> None:
        return None


class _AdmittingSite(web.TCPSite):
    """web.TCPSite whose listener refuses over-limit sources before aiohttp sees them."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 admission: Admission, backlog: int) -> None:
        super().__init__(runner, host, port, backlog=backlog)
        self._admission = admission

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._admission.watch(server)
        sockets = listening_sockets(self._host or "", self._port, self._backlog,
                                    bool(self._reuse_port))
        self._server = cast(asyncio.Server, _Listener(sockets, server, self._admission))
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def in_turn(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
            ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Run a registry handler inside its client's turn (SourceTurns). Only the registry
    routes: a pairing mailbox long-poll waits for seconds and must not hold a turn."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        turns = request.app[TURNS_KEY]
        if not turns.enabled:
            return await handler(request)
        source = source_key(request.remote)
        await turns.acquire(source)
        try:
            return await handler(request)
        finally:
            turns.release(source)

    return wrapped


def _purge_interval_s(ttl_s: float) -> float:
    return max(PURGE_INTERVAL_MIN_S, min(PURGE_INTERVAL_MAX_S, ttl_s / 2))


async def _maintenance_loop(store: RegistryStore, ttl_s: float) -> None:
    """Flush queued registrations every FLUSH_INTERVAL_S; purge expired rows now and then."""
    purge_every_s = _purge_interval_s(ttl_s)
    next_purge = time.monotonic() + purge_every_s
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        try:
            store.flush()
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + purge_every_s
                # small batches so a big purge never stalls requests for long
                while store.purge_expired(time.time()) > 0:
                    await asyncio.sleep(0)
        except P2PError as exc:  # disk full and the like: keep serving, say so
            log.error("registry maintenance failed: %s", exc)


def create_app(db_path: Path, ttl_s: float = DEFAULT_TTL_S, *,
               max_registrations: int = MAX_REGISTRATIONS,
               limits: ServerLimits | None = None, stats: bool = False) -> web.Application:
    """The bootstrap app; opens the registry on startup and closes it on cleanup.

    ``stats`` adds the bench-only timing of bootstrap.stats (off by default: a public
    server exposes nothing of its internals)."""
    if not ttl_s > 0:
        raise ValueError("ttl_s must be positive")
    limits = limits or ServerLimits()
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware])
    app[TTL_KEY] = float(ttl_s)
    app[LIMITS_KEY] = limits
    app[REGISTER_LIMITER_KEY] = RateLimiter(limits.register_rate_per_s, limits.register_burst)
    app[LIST_LIMITER_KEY] = RateLimiter(limits.list_rate_per_s, limits.list_burst)
    app[TARPIT_KEY] = [0]
    app[TURNS_KEY] = SourceTurns(limits.concurrent_per_source, limits.waiting_per_source,
                                 pace_per_s=limits.pace_per_s)

    async def registry(app: web.Application) -> AsyncIterator[None]:
        store = RegistryStore(db_path, max_registrations=max_registrations,
                              max_legacy_per_source=limits.legacy_ids_per_source)
        app[STORE_KEY] = store
        purger = asyncio.create_task(_maintenance_loop(store, ttl_s))
        try:
            yield
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            store.close()

    app.cleanup_ctx.append(registry)
    app.router.add_post("/register", in_turn(handle_register))
    app.router.add_delete("/register/{device_id}", in_turn(handle_unregister))
    app.router.add_get("/peers", in_turn(handle_peers))
    app.router.add_get("/health", in_turn(handle_health))
    from bootstrap.mailbox import add_mailbox_routes

    add_mailbox_routes(app)  # the pairing mailbox: /pair/* (bootstrap/mailbox.py)
    if stats:
        from bootstrap import stats as bench_stats

        bench_stats.enable(app)
    app[ADMISSION_KEY] = Admission(app)
    return app


async def start_server(host: str, port: int, db_path: Path,
                       ttl_s: float = DEFAULT_TTL_S, *,
                       access_log: bool = False,
                       limits: ServerLimits | None = None,
                       stats: bool = False) -> tuple[web.AppRunner, int]:
    """Start serving on host:port (0 = any free port); returns the runner and bound port."""
    limits = limits or ServerLimits()
    # aiohttp arms keepalive_timeout when a connection opens and again after each answer,
    # and closes the connection when it fires while no request has been parsed: a client
    # that sends no request, or half a header (slowloris), is dropped after it, however
    # slowly it trickles bytes (tests/integration/test_bootstrap_server.py proves it)
    runner = web.AppRunner(create_app(db_path, ttl_s, limits=limits, stats=stats),
                           access_log=log if access_log else None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           keepalive_timeout=limits.header_timeout_s,
                           lingering_time=min(LINGERING_TIME_S, limits.body_timeout_s),
                           # a client that hangs up ends its handler at once: a flooder that
                           # drops its tarpitted requests leaves no sleeping handler behind
                           # (each holds its request, ~50 objects, for TARPIT_DELAY_S)
                           handler_cancellation=True,
                           logger=http_log)
    await runner.setup()
    try:
        site = _AdmittingSite(runner, host, port, backlog=1024,
                              admission=runner.app[ADMISSION_KEY])
        with bind_errors("bootstrap", host, port, option="--port"):
            await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            bound = int(addr[1])
            break
    return runner, bound


def default_db_path() -> Path:
    import platformdirs

    return platformdirs.user_data_path("p2pfs") / DB_FILE_NAME


def run(host: str = "127.0.0.1", port: int = DEFAULT_PORT, db_path: Path | None = None,
        ttl_s: float = DEFAULT_TTL_S, limits: ServerLimits | None = None,
        stats: bool = False) -> None:
    """Serve until SIGINT/SIGTERM (blocking); used by `node bootstrap` and `python -m bootstrap`."""
    db = db_path if db_path is not None else default_db_path()

    async def main() -> None:
        runner, bound = await start_server(host, port, db, ttl_s, limits=limits,
                                           access_log=log.isEnabledFor(logging.DEBUG),
                                           stats=stats)
        # everything allocated so far lives as long as the server: keep it out of the
        # cyclic collector's full passes, which otherwise stall the loop tens of ms
        gc.freeze()
        url_host = f"[{host}]" if ":" in host else host
        log.info("bootstrap server listening on http://%s:%d (registry %s, ttl %.0f s)",
                 url_host, bound, db, ttl_s)
        lim = limits or ServerLimits()
        log.info("per-address limits: register %g/s burst %d, list %g/s burst %d, "
                 "legacy ids %d, turns %d paced %g/s (0 = unlimited); header/body timeouts "
                 "%g/%g s", lim.register_rate_per_s, lim.register_burst, lim.list_rate_per_s,
                 lim.list_burst, lim.legacy_ids_per_source, lim.concurrent_per_source,
                 lim.pace_per_s, lim.header_timeout_s, lim.body_timeout_s)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
            log.info("bootstrap server stopping")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await runner.cleanup()
        log.info("bootstrap server stopped")

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional (not on Windows)
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
