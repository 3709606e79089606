"""A small HTTP/1.1 client for the node's few small JSON requests to a bootstrap server.

Why not aiohttp: the node asks its bootstrap server a few hundred bytes every
registration interval, and aiohttp's client (with multidict, yarl, propcache,
frozenlist, aiohappyeyeballs and its C parser) costs every running node about
8.6 MB of resident memory (data-path issue, item 7). This module is asyncio
streams plus h11 (the python-hyper project's sans-IO HTTP/1.1 state machine,
about 0.45 MB), which does all the parsing and framing (Content-Length, chunked,
until EOF), so no HTTP parser of our own reads what a server sends. One request
per connection (``Connection: close``), http and https
(``ssl.create_default_context``, the system's CA store, hostname checked).

Everything the server sends is bounded: the status line and headers together
(``MAX_LINE_BYTES``: h11's incomplete-event limit while they arrive, then checked
whole), the number of headers
(``MAX_HEADERS``) and the body (``max_body_bytes``); the whole exchange has one
deadline. A malformed answer raises ``HttpProtocolError`` (a ``ValueError``);
socket failures raise ``OSError`` and a missed deadline ``TimeoutError``, for the
caller to map.

Must not import the node or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11

MAX_LINE_BYTES = 8 * 1024
HAPPY_EYEBALLS_DELAY_S = 0.25  # RFC 8305's recommended connection attempt delay
CLOSE_TIMEOUT_S = 1.0  # waiting for the server's side of the close, after the answer
MAX_HEADERS = 100
DEFAULT_PORTS = {"http": 80, "https": 443}
USER_AGENT = "p2pfs-node"


class HttpProtocolError(ValueError):
    """The server's answer is not HTTP/1.x as this client reads it, or is over a bound."""


class HttpBodyTooLarge(HttpProtocolError):
    """The answer's body is over ``max_body_bytes``."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes


_ssl_context: ssl.SSLContext | None = None


def _client_ssl_context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


async def request(method: str, url: str, *, body: bytes | None = None,
                  params: dict[str, str] | None = None,
                  headers: dict[str, str] | None = None,
                  timeout_s: float = 5.0, max_body_bytes: int = 4 * 1024 * 1024) -> HttpResponse:
    """Send one request to ``url`` and read the whole answer within ``timeout_s``."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise HttpProtocolError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    target = parts.path or "/"
    query = parts.query
    if params:
        query = (query + "&" if query else "") + urlencode(params)
    if query:
        target += "?" + query
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{port}"
    fields = [("Host", host_header), ("User-Agent", USER_AGENT),
              ("Accept", "application/json"), ("Connection", "close")]
    fields += list((headers or {}).items())
    if body is not None or method in ("POST", "PUT", "DELETE", "PATCH"):
        fields.append(("Content-Length", str(len(body or b""))))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_LINE_BYTES)
    try:
        events: list[h11.Event] = [h11.Request(method=method, target=target, headers=fields)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        out = b"".join(conn.send(e) or b"" for e in events)
    except h11.LocalProtocolError as exc:
        raise HttpProtocolError(f"cannot send this request: {exc}") from None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=_client_ssl_context() if parts.scheme == "https" else None,
                **_happy_eyeballs())
            writer.write(out)
            await writer.drain()
            return await _read_response(conn, reader, max_body_bytes)
    finally:
        if writer is not None:
            writer.close()
            # the answer is read (or the request failed): how the server hangs up does
            # not matter, and a slow TLS close must not turn a good answer into a timeout
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await writer.wait_closed()


READ_BYTES = 64 * 1024


def _happy_eyeballs() -> dict[str, Any]:
    """Happy eyeballs as aiohttp did (a dead AAAA record does not eat the deadline),
    where the running loop has it: uvloop's create_connection takes no such argument."""
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        return {}
    return {"happy_eyeballs_delay": HAPPY_EYEBALLS_DELAY_S}


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpProtocolError(f"not an HTTP/1.x answer as h11 reads it: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_BYTES))  # b"" is EOF: h11 decides


async def _read_response(conn: h11.Connection, reader: asyncio.StreamReader,
                         max_body_bytes: int) -> HttpResponse:
    event = await _next_event(conn, reader)
    while isinstance(event, h11.InformationalResponse):  # 1xx: the real answer follows
        event = await _next_event(conn, reader)
    if not isinstance(event, h11.Response):
        raise HttpProtocolError(f"the server closed the connection before answering ({event!r})")
    if len(event.headers) > MAX_HEADERS:
        raise HttpProtocolError(f"more than {MAX_HEADERS} HTTP headers")
    # h11's limit only applies while a head is incomplete (a head that arrived in one
    # read passes it), so the head's size is checked once more, whole
    head_bytes = len(event.reason) + sum(len(k) + len(v) + 4 for k, v in event.headers)
    if head_bytes > MAX_LINE_BYTES:
        raise HttpProtocolError(f"HTTP status line and headers over {MAX_LINE_BYTES} bytes")
    status = event.status_code
    length = next((int(v) for k, v in event.headers if k == b"content-length"), None)
    if length is not None and length > max_body_bytes:
        raise HttpBodyTooLarge(f"HTTP body of {length} bytes is over {max_body_bytes}")
    buf = bytearray()
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            buf += event.data
            if len(buf) > max_body_bytes:
                raise HttpBodyTooLarge(f"HTTP body over {max_body_bytes} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, bytes(buf))
        else:
            raise HttpProtocolError(f"the server closed the connection inside the body "
                                    f"({event!r})")
