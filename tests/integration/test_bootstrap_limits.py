"""The bootstrap server's per-address limits and timeouts, over real sockets on 127.0.0.0/8.

"Different addresses" are distinct loopback addresses (127.0.0.2, 127.0.0.3):
client sockets are bound to them, the server listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bootstrap.limits import TARPIT_DELAY_S, ServerLimits
from bootstrap.server import start_server

FLOOD_IP, HONEST_IP = "127.0.0.2", "127.0.0.3"


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


class Srv:
    def __init__(self, runner: Any, port: int) -> None:
        self.runner, self.port = runner, port
        self.url = f"http://127.0.0.1:{port}"
        self.sessions: dict[str, aiohttp.ClientSession] = {}

    def http(self, local_ip: str) -> aiohttp.ClientSession:
        if local_ip not in self.sessions:
            self.sessions[local_ip] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(local_addr=(local_ip, 0)))
        return self.sessions[local_ip]

    async def call(self, local_ip: str, method: str, path: str, body: Any = None
                   ) -> tuple[int, Any, Any]:
        data = None if body is None else json.dumps(body).encode()
        async with self.http(local_ip).request(method, self.url + path, data=data) as resp:
            return resp.status, json.loads(await resp.text()), resp.headers

    async def close(self) -> None:
        for s in self.sessions.values():
            await s.close()
        await self.runner.cleanup()


def server_fixture(**limits: Any) -> Any:
    @pytest.fixture
    async def fixture(tmp_path: Path) -> AsyncIterator[Srv]:
        runner, port = await start_server("127.0.0.1", 0, tmp_path / "reg.sqlite3", 300.0,
                                          limits=ServerLimits(**limits))
        srv = Srv(runner, port)
        try:
            yield srv
        finally:
            await srv.close()
    return fixture


limited = server_fixture(register_rate_per_s=1.0, register_burst=3, list_rate_per_s=1.0,
                         list_burst=2, legacy_ids_per_source=4)
short_timeouts = server_fixture(header_timeout_s=0.5, body_timeout_s=0.5)


async def test_registrations_are_rate_limited_per_address(limited: Srv) -> None:
    for i in range(3):
        status, _, _ = await limited.call(FLOOD_IP, "POST", "/register", {"device_id": f"f{i}"})
        assert status == 200
    t0 = time.monotonic()
    status, body, headers = await limited.call(FLOOD_IP, "POST", "/register",
                                               {"device_id": "f3"})
    assert status == 429 and "too many registrations" in body["error"]
    # the refusal is tarpitted: a client that asks again at once waits a second first
    assert time.monotonic() - t0 >= TARPIT_DELAY_S * 0.9
    assert int(headers["Retry-After"]) >= 1
    # another address is not affected, and listing has its own bucket
    status, body, _ = await limited.call(HONEST_IP, "POST", "/register", {"device_id": "h0"})
    assert status == 200 and body["peers"][-1] == "h0"
    assert (await limited.call(FLOOD_IP, "GET", "/peers"))[0] == 200
    assert (await limited.call(FLOOD_IP, "GET", "/peers"))[0] == 200
    status, body, headers = await limited.call(FLOOD_IP, "GET", "/peers")
    assert status == 429 and "Retry-After" in headers
    assert (await limited.call(HONEST_IP, "GET", "/peers"))[0] == 200
    # a refused registration changed nothing
    assert (await limited.call(HONEST_IP, "GET", "/health"))[1]["online"] == 4


async def test_legacy_ids_are_capped_per_address(tmp_path: Path) -> None:
    runner, port = await start_server("127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0,
                                      limits=ServerLimits(legacy_ids_per_source=4))
    srv = Srv(runner, port)
    try:
        for i in range(4):
            assert (await srv.call(FLOOD_IP, "POST", "/register", {"device_id": f"x{i}"}))[0] \
                == 200
        status, body, headers = await srv.call(FLOOD_IP, "POST", "/register",
                                               {"device_id": "x4"})
        assert status == 429 and "unsigned device ids" in body["error"]
        assert "Retry-After" in headers
        assert (await srv.call(FLOOD_IP, "POST", "/register", {"device_id": "x0"}))[0] == 200
        assert (await srv.call(HONEST_IP, "POST", "/register", {"device_id": "x4"}))[0] == 200
    finally:
        await srv.close()


async def _open_slowloris(port: int, n: int) -> list[tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]]:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(FLOOD_IP, 0))
        writer.write(b"POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        conns.append((reader, writer))
    return conns


async def test_slowloris_connections_are_closed_within_the_header_timeout(
        short_timeouts: Srv) -> None:
    conns = await _open_slowloris(short_timeouts.port, 50)
    t0 = time.monotonic()
    closed = [False] * len(conns)

    async def trickle_until_closed(i: int) -> None:
        reader, writer = conns[i]
        # one more header byte every 0.1 s: a trickle must not keep the connection open
        while not reader.at_eof():
            try:
                writer.write(b"n")
                await asyncio.wait_for(reader.read(1024), 0.1)
            except TimeoutError:
                continue
            except ConnectionError:
                break
        closed[i] = True

    tasks = [asyncio.create_task(trickle_until_closed(i)) for i in range(len(conns))]
    try:
        await wait_for(lambda: all(closed), 5.0, "the server to close 50 slowloris connections")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, w in conns:
            w.close()
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5 + 2.0, elapsed
    # the server still answers everybody else
    assert (await short_timeouts.call(HONEST_IP, "GET", "/health"))[0] == 200


async def test_slow_body_is_answered_408_and_closed(short_timeouts: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", short_timeouts.port,
                                                   local_addr=(FLOOD_IP, 0))
    try:
        writer.write(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"devi")
        t0 = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 5.0)  # until the server closes
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - t0 < 3.0
    finally:
        writer.close()


async def test_client_faults_leave_no_error_traceback(
        short_timeouts: Srv, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="p2pfs.bootstrap")
    port = short_timeouts.port

    async def send_and_hang_up(data: bytes, read: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        got = await asyncio.wait_for(reader.read(), 5.0) if read else b""
        writer.close()
        return got

    # malformed request lines and headers get aiohttp's 400
    for bad in (b"GET  HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\xa5\x01\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",
                b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n"):
        answer = await send_and_hang_up(bad, read=True)
        assert answer.startswith(b"HTTP/1.") and answer[9:12] == b"400", answer[:60]
    # hang up in the middle of a body, plain and chunked (after a pause: an address's
    # connections are read SETUP_BURST at once, and one whose client hung up before it
    # was read is dropped unread, with nothing to log)
    await asyncio.sleep(0.05)
    await send_and_hang_up(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                           b"\r\n{\"dev", read=False)
    await send_and_hang_up(b"POST /register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                           b"chunked\r\n\r\n5\r\n{\"dev", read=False)
    await wait_for(lambda: sum("hung up" in r.getMessage() for r in caplog.records) >= 2,
                   5.0, "the server to notice both hang-ups")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    assert (await short_timeouts.call(HONEST_IP, "GET", "/health"))[0] == 200


# -- the flood p99 (issue 9 item 8): what keeps one address from delaying the others ----


async def test_a_tarpitted_request_whose_client_hung_up_is_dropped_at_once(
        limited: Srv) -> None:
    from bootstrap.server import TARPIT_KEY

    waiting = limited.runner.app[TARPIT_KEY]
    for _ in range(2):
        assert (await limited.call(FLOOD_IP, "GET", "/peers"))[0] == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port,
                                                   local_addr=(FLOOD_IP, 0))
    writer.write(b"GET /peers HTTP/1.1\r\nHost: x\r\n\r\n")  # over the limit: tarpitted
    await wait_for(lambda: waiting[0] == 1, 2.0, "the refusal to be tarpitted")
    writer.close()  # a flooder that does not wait for its 429
    t0 = time.monotonic()
    # the server drops the waiting handler (and the request it holds) when the client goes,
    # instead of keeping it for the whole tarpit delay
    await wait_for(lambda: waiting[0] == 0, TARPIT_DELAY_S, "the tarpitted handler to end")
    assert time.monotonic() - t0 < TARPIT_DELAY_S * 0.5


one_turn = server_fixture(concurrent_per_source=1, body_timeout_s=5.0)


async def test_an_address_has_its_turns_and_the_others_are_served_meanwhile(
        one_turn: Srv) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", one_turn.port,
                                                   local_addr=(FLOOD_IP, 0))
    rest = b'ice_id": "slow-one"}'
    writer.write(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{\"dev" % (5 + len(rest)))
    try:
        await asyncio.sleep(0.1)  # the slow body now holds FLOOD_IP's only turn
        second = asyncio.create_task(one_turn.call(FLOOD_IP, "GET", "/health"))
        # another address is answered while FLOOD_IP's second request waits its turn
        assert (await asyncio.wait_for(one_turn.call(HONEST_IP, "GET", "/health"), 2.0))[0] \
            == 200
        assert not second.done()
        writer.write(rest)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:60]
        assert (await asyncio.wait_for(second, 2.0))[0] == 200
    finally:
        writer.close()


unlimited = server_fixture(register_rate_per_s=0.0, list_rate_per_s=0.0,
                           legacy_ids_per_source=0, concurrent_per_source=0)


async def test_a_big_listing_gives_the_loop_back_between_slices(unlimited: Srv) -> None:
    from bootstrap.limits import LIST_PAGE_ROWS
    from bootstrap.server import STORE_KEY

    store = unlimited.runner.app[STORE_KEY]
    now = time.time()
    ids = [f"peer-{i:05d}" for i in range(1000)]
    store.bulk_load((d, None, now, now + 600) for d in ids)
    ticks = [0]

    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0)

    slices: list[tuple[int, int]] = []  # (rows, loop ticks when the slice was read)
    real_page = store.page_items

    def page(limit: int, after: Any, *, now: float) -> Any:
        rows = real_page(limit, after, now=now)
        slices.append((len(rows), ticks[0]))
        return rows

    store.page_items = page  # type: ignore[method-assign]
    tick_task = asyncio.create_task(ticker())
    try:
        status, body, _ = await unlimited.call(HONEST_IP, "GET", "/peers?limit=1000")
    finally:
        tick_task.cancel()
    assert status == 200
    assert [p["device_id"] for p in body["peers"]] == sorted(ids)
    assert body["next_cursor"] is not None
    # read in slices of one page, and other tasks ran between every two of them
    assert len(slices) == 1000 // LIST_PAGE_ROWS
    assert all(n == LIST_PAGE_ROWS for n, _ in slices)
    assert all(b[1] > a[1] for a, b in zip(slices, slices[1:], strict=False))
    # the cursor of a full answer leads on, past the last row
    status, rest, _ = await unlimited.call(
        HONEST_IP, "GET", f"/peers?limit=1000&cursor={body['next_cursor']}")
    assert status == 200 and rest["peers"] == [] and rest["next_cursor"] is None


async def _reset_at_once(port: int, local_ip: str) -> bool:
    """Connect from ``local_ip`` and send a request: True if the server resets the
    connection without answering, False if it answers (any status)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(local_ip, 0))
    except ConnectionError:  # reset before the client saw its connect complete
        return True
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(64), TARPIT_DELAY_S * 3)
    except ConnectionError:
        return True
    finally:
        writer.close()
    return answer == b""


async def _exhaust(srv: Srv, ip: str) -> None:
    while (await srv.call(ip, "POST", "/register", {"device_id": "x"}))[0] != 429:
        pass
    while (await srv.call(ip, "GET", "/peers"))[0] != 429:
        pass


async def _tiny_buckets(tmp_path: Path, **limits: Any) -> Srv:
    """A server whose buckets hold 2 tokens and refill at 0.2/s: a token comes back only
    after 5 s, longer than these tests."""
    runner, port = await start_server(
        "127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0,
        limits=ServerLimits(register_rate_per_s=0.2, register_burst=2, list_rate_per_s=0.2,
                            list_burst=2, **limits))
    return Srv(runner, port)


async def test_an_address_over_every_limit_is_refused_at_accept(tmp_path: Path) -> None:
    srv = await _tiny_buckets(tmp_path)
    port = srv.port
    try:
        await _exhaust(srv, FLOOD_IP)
        # each of its requests would be a 429: it is not even parsed
        t0 = time.monotonic()
        assert await _reset_at_once(port, FLOOD_IP)
        assert time.monotonic() - t0 < TARPIT_DELAY_S / 2  # no tarpit either
        # everybody else connects and is answered as before
        assert not await _reset_at_once(port, HONEST_IP)
        assert (await srv.call(HONEST_IP, "GET", "/health"))[0] == 200
    finally:
        await srv.close()


async def test_an_address_with_one_bucket_left_is_still_admitted(tmp_path: Path) -> None:
    srv = await _tiny_buckets(tmp_path)
    port = srv.port
    try:
        while (await srv.call(FLOOD_IP, "POST", "/register", {"device_id": "x"}))[0] != 429:
            pass
        # over its registration limit, not its listing limit: it may still list
        assert not await _reset_at_once(port, FLOOD_IP)
        assert (await srv.call(FLOOD_IP, "GET", "/peers"))[0] == 200
    finally:
        await srv.close()


@pytest.mark.slow
def test_refusal_at_accept_under_uvloop_logs_no_error(tmp_path: Path) -> None:
    """`python -m bootstrap` runs on uvloop, whose transports are not asyncio's."""
    import os
    import re
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bootstrap", "--port", "0", "--db",
             str(tmp_path / "b.sqlite3"), "--register-rate", "0.2", "--register-burst", "2",
             "--list-rate", "0.2", "--list-burst", "2"],
            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stderr=log_file)
    try:
        deadline = time.monotonic() + 20
        while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)",
                                  log_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port = int(m.group(1))

        async def scenario() -> tuple[bool, bool]:
            srv = Srv(None, port)
            try:
                await _exhaust(srv, FLOOD_IP)
                return (await _reset_at_once(port, FLOOD_IP),
                        await _reset_at_once(port, HONEST_IP))
            finally:
                for s in srv.sessions.values():
                    await s.close()

        flood_reset, honest_reset = asyncio.run(scenario())
        assert flood_reset and not honest_reset
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        text = log_path.read_text()
        assert " ERROR " not in text and "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_pairing_long_poll_does_not_hold_a_turn(one_turn: Srv) -> None:
    # both ends of a pairing behind one address long-poll the mailbox for seconds: were
    # that inside the address's turns, its other requests (the very post that would
    # answer the poll, registrations) would wait for the poll's timeout
    status, alloc, _ = await one_turn.call(FLOOD_IP, "POST", "/pair/allocate", {})
    assert status == 200
    url = (f"{one_turn.url}/pair/{alloc['nameplate']}/fetch?after=0&wait=5")
    session = one_turn.http(FLOOD_IP)

    async def long_poll() -> int:
        async with session.get(url, headers={"X-Pair-Token": alloc["token"]}) as resp:
            await resp.read()
            return resp.status

    polls = [asyncio.create_task(long_poll()) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)  # both polls are waiting in the server now
        assert not any(p.done() for p in polls)
        t0 = time.monotonic()
        status, _, _ = await asyncio.wait_for(
            one_turn.call(FLOOD_IP, "POST", "/register", {"device_id": "paired"}), 2.0)
        assert status == 200 and time.monotonic() - t0 < 1.0
    finally:
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)


# -- bench timing (bootstrap.stats): off by default, per-source hold times when on ----------


async def test_bench_stats_are_not_served_by_default(limited: Srv) -> None:
    status, body, _ = await limited.call(HONEST_IP, "GET", "/_bench/stats")
    assert status == 404 and "error" in body


async def test_bench_stats_time_each_request_per_source(tmp_path: Path) -> None:
    runner, port = await start_server("127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0,
                                      stats=True)
    srv = Srv(runner, port)
    try:
        for _ in range(3):
            assert (await srv.call(HONEST_IP, "GET", "/peers"))[0] == 200
        assert (await srv.call(FLOOD_IP, "GET", "/health"))[0] == 200
        status, stats, _ = await srv.call(
            "127.0.0.1", "GET", f"/_bench/stats?reset=1&group={HONEST_IP},{FLOOD_IP}")
        assert status == 200
        assert stats["sources"][HONEST_IP]["count"] == 3
        assert stats["sources"][FLOOD_IP]["count"] == 1
        assert stats["group"]["count"] == 4
        assert 0 < stats["group"]["p50_ms"] <= stats["group"]["max_ms"]
        assert "127.0.0.1" not in stats["sources"]  # the stats requests are not counted
        # reset: the next answer starts from nothing
        status, again, _ = await srv.call("127.0.0.1", "GET", "/_bench/stats")
        assert again["sources"] == {} and again["group"] == {"count": 0}
    finally:
        await srv.close()


# -- admission at accept: no more open connections than tokens, none while requests queue --


async def _idle_connection(port: int, local_ip: str) -> asyncio.StreamWriter:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local_ip, 0))
    return writer


async def test_an_address_holds_no_more_open_connections_than_tokens(tmp_path: Path) -> None:
    from bootstrap.limits import ADMIT_MIN_CONNECTIONS
    from bootstrap.server import ADMISSION_KEY

    runner, port = await start_server(
        "127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0,
        limits=ServerLimits(register_rate_per_s=0.01, register_burst=2, list_rate_per_s=0.01,
                            list_burst=ADMIT_MIN_CONNECTIONS))
    srv = Srv(runner, port)
    admission = runner.app[ADMISSION_KEY]
    idle: list[asyncio.StreamWriter] = []
    try:
        while (await srv.call(FLOOD_IP, "POST", "/register", {"device_id": "x"}))[0] != 429:
            pass
        await srv.sessions.pop(FLOOD_IP).close()
        await wait_for(lambda: admission.open_connections(FLOOD_IP) == 0, 5.0,
                       "the session's connections to close")
        # FLOOD_IP has ADMIT_MIN_CONNECTIONS listing tokens left: that many connections
        for _ in range(ADMIT_MIN_CONNECTIONS):
            idle.append(await _idle_connection(port, FLOOD_IP))
        await wait_for(lambda: admission.open_connections(FLOOD_IP) == ADMIT_MIN_CONNECTIONS,
                       5.0, "the idle connections to be admitted")
        # one more could only carry a request answered 429: reset before any parsing
        assert await _reset_at_once(port, FLOOD_IP)
        assert not await _reset_at_once(port, HONEST_IP)
        # a connection closed frees its place
        idle.pop().close()
        await wait_for(lambda: admission.open_connections(FLOOD_IP) < ADMIT_MIN_CONNECTIONS,
                       5.0, "the server to see the close")
        status, _, _ = await srv.call(FLOOD_IP, "GET", "/peers")
        assert status == 200
    finally:
        for writer in idle:
            writer.close()
        await srv.close()


async def test_a_connection_without_a_peername_still_gives_its_count_back(
        tmp_path: Path) -> None:
    """A client that resets right after connecting leaves its transport without a
    peername (ENOTCONN) when aiohttp's handler starts; the count admit() added must still
    be given back when it closes, or the address is refused at accept for good after a
    few hundred such resets. A socketpair has no IP peername at all: the same case, made
    certain."""
    import socket as socket_mod

    from bootstrap.server import ADMISSION_KEY

    runner, port = await start_server("127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0)
    srv = Srv(runner, port)
    admission = runner.app[ADMISSION_KEY]
    listener = next(iter(runner.sites))._server  # the site's own accept loop
    try:
        assert admission.admit(FLOOD_IP)  # as its accept loop does for an accepted socket
        ours, theirs = socket_mod.socketpair()
        ours.setblocking(False)
        await listener._connect(ours, FLOOD_IP)
        assert admission.open_connections(FLOOD_IP) == 1
        theirs.close()  # the client goes: the handler closes
        await wait_for(lambda: admission.open_connections(FLOOD_IP) == 0, 5.0,
                       "the closed connection to be given back")
    finally:
        await srv.close()


def _listener(srv: Srv) -> Any:
    (site,) = srv.runner.sites
    return site._server  # the _AdmittingSite's _Listener


async def _answer(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)


SLOW_REST = b'ice_id": "slow-one"}'


async def _hold_the_only_turn(port: int, turns: Any
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A registration whose body is still coming holds FLOOD_IP's only turn (a server
    with concurrent_per_source=1); writing SLOW_REST ends it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(FLOOD_IP, 0))
    writer.write(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{\"dev" % (5 + len(SLOW_REST)))
    try:
        await wait_for(lambda: turns.active(FLOOD_IP) == 1, 2.0, "the slow request's turn")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _fill_the_line(port: int, turns: Any, conns: list[Any]) -> None:
    """ADMIT_MAX_QUEUED requests of FLOOD_IP waiting in line behind its turn, each seen
    waiting before the next is sent; their (reader, writer) pairs go into ``conns``."""
    from bootstrap.limits import ADMIT_MAX_QUEUED

    for i in range(ADMIT_MAX_QUEUED):
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(FLOOD_IP, 0))
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        conns.append((r, w))
        await wait_for(lambda i=i: turns.waiting(FLOOD_IP) == i + 1, 2.0,
                       f"request {i + 1} to wait in line")


async def test_a_new_connection_waits_unread_while_an_address_has_requests_in_line(
        one_turn: Srv) -> None:
    from bootstrap.limits import ADMIT_MAX_QUEUED
    from bootstrap.server import TURNS_KEY

    turns = one_turn.runner.app[TURNS_KEY]
    reader, writer = await _hold_the_only_turn(one_turn.port, turns)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await _fill_the_line(one_turn.port, turns, conns)
        r, w = await asyncio.open_connection("127.0.0.1", one_turn.port,
                                             local_addr=(FLOOD_IP, 0))
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        conns.append((r, w))
        # the first ADMIT_MAX_QUEUED wait in line; the next is neither parsed nor reset
        await wait_for(lambda: len(_listener(one_turn)._deferred.get(FLOOD_IP, ())) == 1,
                       2.0, "the next connection to wait unread")
        await asyncio.sleep(0.1)
        assert turns.waiting(FLOOD_IP) == ADMIT_MAX_QUEUED
        assert len(_listener(one_turn)._deferred.get(FLOOD_IP, ())) == 1
        # another address is served meanwhile
        assert (await one_turn.call(HONEST_IP, "GET", "/health"))[0] == 200
        # the line moves: every request of FLOOD_IP is answered, the waiting one too
        writer.write(SLOW_REST)
        assert (await _answer(reader, 2.0)).startswith(b"HTTP/1.1 200")
        for r, _ in conns:
            assert (await _answer(r, 2.0)).startswith(b"HTTP/1.1 200")
        assert FLOOD_IP not in _listener(one_turn)._deferred
    finally:
        writer.close()
        for _, w in conns:
            w.close()


async def test_a_waiting_connection_its_client_closed_is_dropped_unread(
        one_turn: Srv) -> None:
    # a flood's patience is short: a connection it gave up on while it waited is not
    # parsed and answered for nobody when its turn comes
    from bootstrap.server import ADMISSION_KEY, STORE_KEY, TURNS_KEY

    turns = one_turn.runner.app[TURNS_KEY]
    admission = one_turn.runner.app[ADMISSION_KEY]
    reader, writer = await _hold_the_only_turn(one_turn.port, turns)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await _fill_the_line(one_turn.port, turns, conns)
        body = b'{"device_id": "abandoned"}'
        gone = await _idle_connection(one_turn.port, FLOOD_IP)
        gone.write(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await wait_for(lambda: len(_listener(one_turn)._deferred.get(FLOOD_IP, ())) == 1,
                       2.0, "the connection to wait unread")
        gone.close()  # its client gives up, its request still unread at the server
        await asyncio.sleep(0.1)
        writer.write(SLOW_REST)  # the line moves
        assert (await _answer(reader, 2.0)).startswith(b"HTTP/1.1 200")
        await wait_for(lambda: FLOOD_IP not in _listener(one_turn)._deferred, 2.0,
                       "the closed connection to leave the line")
        for _, w in conns:
            w.close()
        await wait_for(lambda: admission.open_connections(FLOOD_IP) == 1, 5.0,
                       "every closed connection to be given back")
        store = one_turn.runner.app[STORE_KEY]
        assert store.get("abandoned", now=time.time()) is None  # never handled
        assert store.get("slow-one", now=time.time()) is not None
    finally:
        writer.close()
        for _, w in conns:
            w.close()


async def test_waiting_connections_given_up_on_get_their_address_blocked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a flood that gives up on connection after connection while they wait is blocked
    # as one refused at accept would be; the block drops the rest of its line at once
    from bootstrap import sockfilter
    from bootstrap.server import ADMISSION_KEY, TURNS_KEY

    if not sockfilter.supported():
        pytest.skip("socket filters (SO_ATTACH_FILTER) are Linux only")
    runner, port = await start_server(
        "127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0,
        limits=ServerLimits(concurrent_per_source=1, block_after_refusals=3, block_s=5.0))
    srv = Srv(runner, port)
    turns, admission = runner.app[TURNS_KEY], runner.app[ADMISSION_KEY]
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    writer: asyncio.StreamWriter | None = None
    try:
        with caplog.at_level(logging.WARNING):
            reader, writer = await _hold_the_only_turn(port, turns)
            await _fill_the_line(port, turns, conns)
            gone = []
            for _ in range(6):
                w = await _idle_connection(port, FLOOD_IP)
                w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                gone.append(w)
            await wait_for(lambda: len(_listener(srv)._deferred.get(FLOOD_IP, ())) == 6,
                           2.0, "the connections to wait unread")
            for w in gone:
                w.close()
            await asyncio.sleep(0.1)
            writer.write(SLOW_REST)  # the line moves: 3 given up on, the address blocked
            assert (await _answer(reader, 2.0)).startswith(b"HTTP/1.1 200")
            await wait_for(lambda: FLOOD_IP not in _listener(srv)._deferred, 2.0,
                           "the line to be dropped")
            assert await _dropped(port, FLOOD_IP)
            for _, w in conns:
                w.close()
            writer.close()
            await wait_for(lambda: admission.open_connections(FLOOD_IP) == 0, 5.0,
                           "every connection to be given back once")
            await asyncio.sleep(0.1)
            assert admission.open_connections(FLOOD_IP) == 0
        assert any("127.0.0.2 went on connecting" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        if writer is not None:
            writer.close()
        for _, w in conns:
            w.close()
        await srv.close()


async def test_connections_opened_at_once_are_set_up_at_a_pace_and_all_served(
        tmp_path: Path) -> None:
    # 64 connections from one address in one burst (a flood's first round, or 64 nodes
    # behind one NAT starting together): none is reset, none waits long, but they get
    # their transports (and so their parsing) a few at a time, not all in one loop turn
    from bootstrap.limits import SETUP_BURST, SETUP_PER_S

    runner, port = await start_server("127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0)
    srv = Srv(runner, port)
    listener = _listener(srv)
    loop = asyncio.get_running_loop()
    set_up: list[float] = []
    real_start = listener._start

    def start(conn: Any, source: str) -> None:
        if source == FLOOD_IP:
            set_up.append(loop.time())
        real_start(conn, source)

    listener._start = start
    n = 64

    async def one() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(FLOOD_IP, 0))
        try:
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            return await _answer(r, 5.0)
        finally:
            w.close()

    try:
        t0 = loop.time()
        answers = await asyncio.gather(*(one() for _ in range(n)))
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        assert loop.time() - t0 < 3.0
        assert len(set_up) == n
        # never more set up by a moment than the burst plus the rate since the first
        for k, at in enumerate(set_up):
            assert k + 1 <= SETUP_BURST + SETUP_PER_S * (at - set_up[0]) + 1, (k, at)
        assert (await srv.call(HONEST_IP, "GET", "/health"))[0] == 200
    finally:
        await srv.close()


async def test_three_hundred_nodes_behind_one_address_starting_together_are_all_served(
        tmp_path: Path) -> None:
    # a testnet on 127.0.0.1, or one NAT: p2pfs nodes open a connection per request
    # (bootstrap.http_lite), all at once here; the set-up and the pacing delay them a
    # little, and refuse none (the address is within its buckets: 500 tokens each)
    from node.contact import ContactRecord
    from node.identity import Identity

    runner, port = await start_server("127.0.0.1", 0, tmp_path / "r.sqlite3", 300.0)
    srv = Srv(runner, port)
    n = 300
    bodies = []
    for i in range(n):
        ident = Identity.generate(f"node-{i}")
        record = ContactRecord.create(ident, ["127.0.0.1"], {"tcp": 20000 + i}, 1)
        bodies.append(json.dumps({"device_id": str(ident.peer_id),
                                  "record": record.to_json()}).encode())

    async def one_request(raw: bytes) -> int:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(HONEST_IP, 0))
        try:
            w.write(raw)
            return int((await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5.0))[9:12])
        finally:
            w.close()

    async def node(i: int) -> list[int]:
        register = (b"POST /register HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(bodies[i]), bodies[i]))
        listing = b"GET /peers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        return [await one_request(register), await one_request(listing)]

    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(node(i) for i in range(n)))
        bad = [r for r in results if r != [200, 200]]
        assert not bad, bad[:5]
        assert time.monotonic() - t0 < 8.0
        assert (await srv.call(HONEST_IP, "GET", "/health"))[1]["online"] == n
    finally:
        await srv.close()


def test_connections_admitted_in_one_loop_turn_count_at_once(tmp_path: Path) -> None:
    # a flood's connections are accepted many per loop turn, before aiohttp has made a
    # handler for any of them: each counts as open as soon as it is admitted
    from bootstrap.limits import ADMIT_MIN_CONNECTIONS
    from bootstrap.server import ADMISSION_KEY, create_app

    app = create_app(tmp_path / "r.sqlite3", 300.0, limits=ServerLimits(
        register_burst=ADMIT_MIN_CONNECTIONS, list_burst=ADMIT_MIN_CONNECTIONS))
    admission = app[ADMISSION_KEY]
    assert [admission.admit(FLOOD_IP) for _ in range(ADMIT_MIN_CONNECTIONS + 1)] == \
        [True] * ADMIT_MIN_CONNECTIONS + [False]
    assert admission.open_connections(FLOOD_IP) == ADMIT_MIN_CONNECTIONS
    admission.abandon(FLOOD_IP)  # one was reset before it reached aiohttp
    assert admission.admit(FLOOD_IP)
    assert admission.admit(HONEST_IP)


async def _dropped(port: int, local_ip: str) -> bool:
    """True if a connect from ``local_ip`` gets no answer at all (its SYN was dropped:
    the kernel retries a SYN after 1 s), False if the server's kernel answered it."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(local_ip, 0)), 0.4)
    except TimeoutError:
        return True
    except ConnectionError:
        return False  # reset: it reached the listener
    writer.close()
    return False


async def test_an_address_that_keeps_connecting_after_its_refusals_is_dropped_in_the_kernel(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bootstrap import sockfilter

    if not sockfilter.supported():
        pytest.skip("socket filters (SO_ATTACH_FILTER) are Linux only")
    srv = await _tiny_buckets(tmp_path, block_after_refusals=8, block_s=1.5)
    port = srv.port
    try:
        await _exhaust(srv, FLOOD_IP)
        with caplog.at_level(logging.WARNING, logger="p2pfs.bootstrap"):
            for _ in range(8):  # refused at accept: the kernel still answers (a reset)
                assert not await _dropped(port, FLOOD_IP)
            t_blocked = time.monotonic()
            assert await _dropped(port, FLOOD_IP)  # its SYNs no longer reach the server
        assert any("127.0.0.2 went on connecting after its 429s" in r.getMessage()
                   for r in caplog.records)
        # it earns no tokens while blocked: it comes back with empty buckets
        from bootstrap.server import LIST_LIMITER_KEY, REGISTER_LIMITER_KEY

        for key in (REGISTER_LIMITER_KEY, LIST_LIMITER_KEY):
            assert srv.runner.app[key].tokens(FLOOD_IP, t_blocked + 1.5) < 0.1
        # everybody else is served meanwhile
        assert (await srv.call(HONEST_IP, "GET", "/health"))[0] == 200
        assert not await _dropped(port, HONEST_IP)
        # the block ends on its own: refused at accept again, not dropped
        await wait_for(lambda: time.monotonic() - t_blocked > 1.6, 5.0, "the block's end")
        assert not await _dropped(port, FLOOD_IP)
    finally:
        await srv.close()


async def test_without_a_block_threshold_refusals_never_become_drops(tmp_path: Path) -> None:
    srv = await _tiny_buckets(tmp_path, block_after_refusals=0)
    port = srv.port
    try:
        await _exhaust(srv, FLOOD_IP)
        for _ in range(80):
            assert not await _dropped(port, FLOOD_IP)
    finally:
        await srv.close()


async def test_a_kernel_that_refuses_the_filter_leaves_refusal_at_accept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno as errno_mod

    from bootstrap import sockfilter
    from bootstrap.server import ADMISSION_KEY

    def refuse(sock: Any, sources: Any) -> None:
        raise OSError(errno_mod.EPERM, "Operation not permitted")

    monkeypatch.setattr(sockfilter, "block", refuse)
    monkeypatch.setattr(sockfilter, "supported", lambda: True)
    srv = await _tiny_buckets(tmp_path, block_after_refusals=4)
    try:
        await _exhaust(srv, FLOOD_IP)
        with caplog.at_level(logging.WARNING, logger="p2pfs.bootstrap"):
            for _ in range(12):  # refused at accept, never dropped
                assert not await _dropped(srv.port, FLOOD_IP)
        said = [r.getMessage() for r in caplog.records if "cannot drop" in r.getMessage()]
        assert len(said) == 1 and "refused at accept instead" in said[0], said
        assert not srv.runner.app[ADMISSION_KEY].blocklist.enabled
    finally:
        await srv.close()
