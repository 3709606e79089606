"""A minimal HTTP/1.1 client for the node's few small JSON requests to a bootstrap server.

Why not aiohttp: the node asks its bootstrap server a few hundred bytes every
registration interval, and aiohttp's client (with multidict, yarl, propcache,
frozenlist, aiohappyeyeballs and its C parser) costs every running node about
8.6 MB of resident memory (data-path issue, item 7). This module is asyncio
streams plus the standard library: one request per connection
(``Connection: close``), http and https (``ssl.create_default_context``, the
system's CA store, hostname checked), a response body by Content-Length,
chunked or until EOF.

Everything the server sends is bounded: the status line and each header line
(``MAX_LINE_BYTES``), the number of headers (``MAX_HEADERS``) and the body
(``max_body_bytes``); the whole exchange has one deadline. A malformed answer
raises ``HttpProtocolError`` (a ``ValueError``); socket failures raise
``OSError`` and a missed deadline ``TimeoutError``, for the caller to map.

Standard library only; must not import the node or aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

MAX_LINE_BYTES = 8 * 1024
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
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}",
             f"User-Agent: {USER_AGENT}", "Accept: application/json", "Connection: close"]
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if body is not None or method in ("POST", "PUT", "DELETE", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=_client_ssl_context() if parts.scheme == "https" else None,
            limit=MAX_LINE_BYTES)
        try:
            writer.write(head + (body or b""))
            await writer.drain()
            return await _read_response(reader, method, max_body_bytes)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass  # the answer is read; how the server hangs up does not matter


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HttpProtocolError(f"HTTP header line over {MAX_LINE_BYTES} bytes") from None
    except asyncio.IncompleteReadError:
        raise HttpProtocolError("the server closed the connection inside the headers") from None
    if len(line) > MAX_LINE_BYTES:
        raise HttpProtocolError(f"HTTP header line over {MAX_LINE_BYTES} bytes")
    return line.rstrip(b"\r\n")


async def _read_response(reader: asyncio.StreamReader, method: str,
                         max_body_bytes: int) -> HttpResponse:
    status_line = await _line(reader)
    fields = status_line.split(b" ", 2)
    if (len(fields) < 2 or not fields[0].startswith(b"HTTP/1.")
            or not fields[1].isdigit() or len(fields[1]) != 3):
        raise HttpProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    status = int(fields[1])
    length: int | None = None
    chunked = False
    for _ in range(MAX_HEADERS + 1):
        line = await _line(reader)
        if not line:
            break
        name, sep, value = line.partition(b":")
        if not sep:
            raise HttpProtocolError(f"malformed HTTP header line {line[:80]!r}")
        key, val = name.strip().lower(), value.strip()
        if key == b"content-length":
            if not val.isdigit() or len(val) > 18 or (length is not None and int(val) != length):
                raise HttpProtocolError(f"bad Content-Length {val[:40]!r}")
            length = int(val)
        elif key == b"transfer-encoding":
            chunked = val.lower().endswith(b"chunked")
    else:
        raise HttpProtocolError(f"more than {MAX_HEADERS} HTTP headers")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return HttpResponse(status, b"")
    if chunked:
        return HttpResponse(status, await _read_chunked(reader, max_body_bytes))
    if length is not None:
        if length > max_body_bytes:
            raise HttpBodyTooLarge(f"HTTP body of {length} bytes is over {max_body_bytes}")
        try:
            return HttpResponse(status, await reader.readexactly(length))
        except asyncio.IncompleteReadError:
            raise HttpProtocolError("the server closed the connection inside the body") from None
    data = await reader.read(max_body_bytes + 1)  # no length: the body ends at EOF
    buf = bytearray(data)
    while data and len(buf) <= max_body_bytes:
        data = await reader.read(max_body_bytes + 1 - len(buf))
        buf += data
    if len(buf) > max_body_bytes:
        raise HttpBodyTooLarge(f"HTTP body over {max_body_bytes} bytes")
    return HttpResponse(status, bytes(buf))


async def _read_chunked(reader: asyncio.StreamReader, max_body_bytes: int) -> bytes:
    buf = bytearray()
    while True:
        size_text = (await _line(reader)).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size < 0 or len(buf) + size > max_body_bytes:
            raise HttpBodyTooLarge(f"HTTP body over {max_body_bytes} bytes")
        if size == 0:
            for _ in range(MAX_HEADERS + 1):  # trailers, up to the empty line
                if not await _line(reader):
                    return bytes(buf)
            raise HttpProtocolError(f"more than {MAX_HEADERS} HTTP trailer lines")
        try:
            buf += await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise HttpProtocolError("the server closed the connection inside a chunk") from None
        if await _line(reader):
            raise HttpProtocolError("missing CRLF after an HTTP chunk")
