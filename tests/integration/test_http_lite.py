"""bootstrap/http_lite.py: the node's small HTTP client, against canned answers on 127.0.0.1.

Each test starts a one-shot TCP server that records the request and writes a
fixed answer, so framing (Content-Length, chunked, EOF) and every bound are
checked byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from bootstrap import http_lite
from bootstrap.http_lite import HttpBodyTooLarge, HttpProtocolError


@asynccontextmanager
async def canned(answer: bytes | Callable[[bytes], bytes]) -> AsyncIterator[
        tuple[str, list[bytes]]]:
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        requests.append(head + body)
        writer.write(answer(head + body) if callable(answer) else answer)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()
        await server.wait_closed()


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def test_post_json_with_content_length() -> None:
    async with canned(_ok(b'{"ok": true}')) as (url, reqs):
        resp = await http_lite.request("POST", url + "/register", body=b'{"a":1}',
                                       headers={"Content-Type": "application/json"})
    assert resp.status == 200 and json.loads(resp.body) == {"ok": True}
    head, _, body = reqs[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /register HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 7" in head and b"\r\nConnection: close" in head
    assert body == b'{"a":1}'


async def test_query_params_are_encoded_and_path_prefix_kept() -> None:
    async with canned(_ok(b"{}")) as (url, reqs):
        await http_lite.request("GET", url + "/base/peers", params={"cursor": "a b&c"})
    assert reqs[0].startswith(b"GET /base/peers?cursor=a+b%26c HTTP/1.1\r\n")


async def test_chunked_body_and_error_status() -> None:
    answer = (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
    async with canned(answer) as (url, _):
        resp = await http_lite.request("GET", url + "/x")
    assert resp.status == 404 and resp.body == b"hello world"


async def test_body_until_eof_without_length() -> None:
    async with canned(b"HTTP/1.0 200 OK\r\n\r\nall of it") as (url, _):
        resp = await http_lite.request("GET", url + "/")
    assert resp.body == b"all of it"


@pytest.mark.parametrize("answer", [
    _ok(b"x" * 101),
    b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 101,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n60\r\n" + b"z" * 96
    + b"\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n",
])
async def test_body_over_the_bound_is_refused(answer: bytes) -> None:
    async with canned(answer) as (url, _):
        with pytest.raises(HttpBodyTooLarge):
            await http_lite.request("GET", url + "/", max_body_bytes=100)


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (http_lite.MAX_LINE_BYTES + 10) + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * (http_lite.MAX_HEADERS + 1) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
])
async def test_malformed_answers_raise_one_error_type(answer: bytes) -> None:
    async with canned(answer) as (url, _):
        with pytest.raises(HttpProtocolError):
            await http_lite.request("GET", url + "/")


async def test_silent_server_hits_the_deadline() -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            await http_lite.request("GET", f"http://127.0.0.1:{port}/", timeout_s=0.2)
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_an_answer_read_whole_is_kept_when_the_close_hangs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A TLS server that never sends close_notify keeps wait_closed() waiting: the answer
    was read whole, so it is returned, not thrown away as a timeout."""
    async def hang(self: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio.StreamWriter, "wait_closed", hang)
    async with canned(_ok(b'{"ok": true}')) as (url, _):
        resp = await http_lite.request("GET", url + "/", timeout_s=0.5)
    assert resp.status == 200 and json.loads(resp.body) == {"ok": True}


def test_requests_work_on_uvloop() -> None:
    """The daemon runs on uvloop, whose create_connection takes fewer arguments than
    asyncio's (no happy_eyeballs_delay): a request must work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def go() -> int:
        async with canned(_ok(b'{"ok": true}')) as (url, _):
            return (await http_lite.request("GET", url + "/")).status

    assert uvloop.run(go()) == 200


async def test_refused_connection_is_an_os_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await http_lite.request("GET", f"http://127.0.0.1:{port}/")


def test_the_bootstrap_client_does_not_import_aiohttp() -> None:
    code = ("import sys, bootstrap.client, node.discovery.bootstrap\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('aiohttp', 'multidict', 'yarl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]", out
