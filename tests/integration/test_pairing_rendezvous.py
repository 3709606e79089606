"""Pairing through a real mailbox on 127.0.0.1: success, wrong/expired/reused codes, and a
hostile rendezvous (man in the middle, replay, drop) that must learn nothing and trust
nobody into either store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bootstrap.mailbox import MAILBOX_KEY, Gone, MailboxStore, add_mailbox_routes
from bootstrap.server import start_server
from node.contact import ContactRecord
from node.identity import Identity
from node.pairing import CodeCancelled, CodeExpired, CodeUsed, PairingError, WrongCode
from node.pairing.code import make_code, parse_code
from node.pairing.mailbox import MailboxClient
from node.pairing.protocol import PakeSide
from node.pairing.service import PairingService
from node.trust import TrustStore


class Side:
    def __init__(self, tmp: Path, name: str, url: str, **kw: Any) -> None:
        self.identity = Identity.generate(name)
        self.trust = TrustStore(tmp / name / "trust.db")
        self.record = ContactRecord.create(self.identity, ["127.0.0.1"], {"tcp": 9000}, 1)
        self.added: list[ContactRecord] = []
        self.events: list[dict[str, Any]] = []
        self.codes: asyncio.Queue[str] = asyncio.Queue()
        self.service = PairingService(self.identity, self.trust, record=lambda: self.record,
                                      add_record=self.added.append, rendezvous=[url], **kw)

    async def emit(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        if ev.get("type") == "code":
            self.codes.put_nowait(ev["code"])


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[tuple[str, MailboxStore]]:
    runner, port = await start_server("127.0.0.1", 0, tmp_path / "b.sqlite3", 300.0)
    app = runner.app
    assert app is not None
    yield f"http://127.0.0.1:{port}", app[MAILBOX_KEY].store
    await runner.cleanup()


async def pair(a: Side, b: Side, *, mangle: Callable[[str], str] = lambda c: c,
               ttl_s: float = 60) -> tuple[Any, Any]:
    inviting = asyncio.ensure_future(a.service.invite(alias="bob", ttl_s=ttl_s, emit=a.emit))
    code = await asyncio.wait_for(a.codes.get(), 10)
    accepting = asyncio.ensure_future(b.service.accept(mangle(code), alias="alice",
                                                       emit=b.emit))
    results = await asyncio.gather(inviting, accepting, return_exceptions=True)
    return results[0], results[1]


def wrong_words(code: str) -> str:
    c = parse_code(code)
    other = make_code(c.nameplate)
    while other.words == c.words:
        other = make_code(c.nameplate)
    return str(other)


async def test_invite_accept_trusts_both_ways(tmp_path: Path, real: tuple[str, MailboxStore]
                                              ) -> None:
    url, store = real
    a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
    ra, rb = await pair(a, b)
    assert ra["peer_id"] == str(b.identity.peer_id) and rb["peer_id"] == str(a.identity.peer_id)
    assert ra["verification"] == rb["verification"]
    assert a.trust.get(b.identity.peer_id).added_via == "invite"
    assert a.trust.alias_of(b.identity.peer_id) == "bob"
    assert b.trust.get(a.identity.peer_id).added_via == "invite"
    assert [r.peer_id for r in a.added] == [b.identity.peer_id]
    assert [r.peer_id for r in b.added] == [a.identity.peer_id]
    assert len(store) == 0  # the mailbox forgot the nameplate after the exchange


async def test_wrong_code_fails_both_and_trusts_nobody(tmp_path: Path,
                                                       real: tuple[str, MailboxStore]) -> None:
    url, store = real
    a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
    ra, rb = await pair(a, b, mangle=wrong_words)
    assert isinstance(ra, WrongCode) and isinstance(rb, WrongCode)
    assert "wrong code or someone tried to guess it" in str(ra)
    assert a.trust.all() == [] and b.trust.all() == []
    assert len(store) == 0
    # the nameplate is closed: the right code no longer works either
    code = next(e["code"] for e in a.events if e["type"] == "code")
    with pytest.raises(WrongCode):
        await Side(tmp_path, "carol", url).service.accept(code, emit=b.emit)


async def test_code_works_once(tmp_path: Path, real: tuple[str, MailboxStore]) -> None:
    url, _ = real
    a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
    ra, rb = await pair(a, b)
    assert not isinstance(ra, BaseException) and not isinstance(rb, BaseException)
    code = next(e["code"] for e in a.events if e["type"] == "code")
    c = Side(tmp_path, "carol", url)
    with pytest.raises(CodeUsed, match="already used"):
        await c.service.accept(code, emit=c.emit)
    assert c.trust.all() == []


async def test_second_claim_while_in_progress_is_refused(tmp_path: Path,
                                                          real: tuple[str, MailboxStore]) -> None:
    url, _ = real
    async with MailboxClient(url) as client:
        number, _token, _ = await client.allocate(60)
        await client.claim(number)
        with pytest.raises(CodeUsed):
            await client.claim(number)


async def test_expired_code_is_a_clear_error(tmp_path: Path, real: tuple[str, MailboxStore]
                                             ) -> None:
    url, _ = real
    a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
    with pytest.raises(CodeExpired, match="expired before the other side used it"):
        await a.service.invite(ttl_s=5, emit=a.emit)
    code = next(e["code"] for e in a.events if e["type"] == "code")
    with pytest.raises(CodeExpired, match="expired"):
        await b.service.accept(code, emit=b.emit)
    assert a.trust.all() == [] and b.trust.all() == []


async def test_unknown_nameplate_is_a_clear_error(tmp_path: Path,
                                                  real: tuple[str, MailboxStore]) -> None:
    url, _ = real
    b = Side(tmp_path, "bob", url)
    with pytest.raises(CodeUsed, match="never existed"):
        await b.service.accept(str(make_code(4242)), emit=b.emit)


# -- a hostile rendezvous -----------------------------------------------------


class MitmStore(MailboxStore):
    """Runs its own PAKE with each side using a guessed code: it knows the nameplate but
    not the words. It relays its own messages instead of theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []
        self.fake: dict[str, PakeSide] = {}

    def post(self, number: int, token: str, phase: str, body: bytes, now: float) -> None:
        self.seen.append(body)
        super().post(number, token, phase, body, now)

    def fetch(self, number: int, token: str, after: int, now: float
              ) -> list[tuple[str, bytes]]:
        out = super().fetch(number, token, after, now)
        side = self._live[number].side_of(token) if number in self._live else "?"
        mangled = []
        for phase, body in out:
            if phase == "pake":
                role = "B" if side == "A" else "A"  # pretend to be the other side
                guess = self.fake.setdefault(side, PakeSide(make_code(number), role))
                body = guess.outbound
            mangled.append((phase, body))
        return mangled


class ReplayStore(MailboxStore):
    """Serves B the PAKE message of an earlier session (same nameplate number, same
    inviter code words are unknown to it): a replay across sessions."""

    replay: bytes | None = None

    def fetch(self, number: int, token: str, after: int, now: float
              ) -> list[tuple[str, bytes]]:
        out = super().fetch(number, token, after, now)
        side = self._live[number].side_of(token) if number in self._live else "?"
        if side == "B" and self.replay is not None:
            out = [(p, self.replay if p == "pake" else b) for p, b in out]
        return out


class DropStore(MailboxStore):
    """Says it took the boxes, and drops them."""

    def post(self, number: int, token: str, phase: str, body: bytes, now: float) -> None:
        if phase != "box":
            super().post(number, token, phase, body, now)


async def hostile(store: MailboxStore) -> tuple[web.AppRunner, str]:
    app = web.Application()
    add_mailbox_routes(app, store=store)
    return await serve(app)


async def test_man_in_the_middle_learns_nothing_and_both_fail(tmp_path: Path) -> None:
    store = MitmStore()
    runner, url = await hostile(store)
    try:
        a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
        ra, rb = await pair(a, b)
        assert isinstance(ra, WrongCode) and isinstance(rb, WrongCode)
        assert a.trust.all() == [] and b.trust.all() == []
        # it never saw an identity key in the clear
        keys = (a.identity.public_key, b.identity.public_key)
        assert not any(k in body for body in store.seen for k in keys)
        assert store._gone and all(t.reason is Gone.FAILED for t in store._gone.values())
    finally:
        await runner.cleanup()


async def test_replayed_pake_message_fails_both(tmp_path: Path) -> None:
    store = ReplayStore()
    runner, url = await hostile(store)
    try:
        # an earlier session's inviter message for the same nameplate number
        old = PakeSide(make_code(1), "A")
        store.replay = old.outbound
        a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
        ra, rb = await pair(a, b)
        assert isinstance(ra, WrongCode) and isinstance(rb, WrongCode)
        assert a.trust.all() == [] and b.trust.all() == []
    finally:
        await runner.cleanup()


async def test_dropped_messages_time_out_and_trust_nobody(tmp_path: Path) -> None:
    runner, url = await hostile(DropStore())
    try:
        a = Side(tmp_path, "alice", url, exchange_timeout_s=1.0)
        b = Side(tmp_path, "bob", url, exchange_timeout_s=1.0)
        ra, rb = await pair(a, b)
        # the first side to time out cancels the code, so the other may learn that from the
        # mailbox instead of timing out itself; neither is told "wrong code"
        assert isinstance(ra, PairingError) and isinstance(rb, PairingError)
        assert any("stopped answering" in str(r) for r in (ra, rb))
        assert all("stopped answering" in str(r) or "gave up" in str(r) for r in (ra, rb)), \
            (ra, rb)
        assert a.trust.all() == [] and b.trust.all() == []
    finally:
        await runner.cleanup()


async def test_claims_are_rate_limited_per_address(tmp_path: Path) -> None:
    app = web.Application()
    add_mailbox_routes(app, claim_rate_per_s=0.01, claim_burst=3)
    runner, url = await serve(app)
    try:
        async with MailboxClient(url) as client:
            refused = 0
            for guess in range(1, 8):
                try:
                    await client.claim(guess)
                except CodeUsed:
                    pass  # no such nameplate: still a guess, still counted
                except Exception as exc:  # noqa: BLE001
                    assert "429" in str(exc) and "too many pairing attempts" in str(exc)
                    refused += 1
            assert refused == 4
    finally:
        await runner.cleanup()


async def test_an_interrupted_invite_cancels_its_code(tmp_path: Path,
                                                      real: tuple[str, MailboxStore]) -> None:
    url, store = real
    a, b = Side(tmp_path, "alice", url), Side(tmp_path, "bob", url)
    inviting = asyncio.ensure_future(a.service.invite(ttl_s=60, emit=a.emit))
    code = await asyncio.wait_for(a.codes.get(), 10)
    inviting.cancel()  # what a Ctrl-C'd CLI (ConnectionError on emit) also leads to
    with pytest.raises(asyncio.CancelledError):
        await inviting
    assert len(store) == 0
    with pytest.raises(CodeCancelled, match="gave up"):
        await b.service.accept(code, emit=b.emit)
    assert b.trust.all() == []


async def test_bad_requests_get_clear_errors_and_change_nothing(
        tmp_path: Path, real: tuple[str, MailboxStore]) -> None:
    import aiohttp

    url, store = real
    async with MailboxClient(url) as client:
        number, token, _ = await client.allocate(60)
    before = (len(store), store.version)
    cases: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("POST", "/pair/allocate", {"ttl_s": 10**9}, {}, 400),
        ("POST", "/pair/allocate", "not an object", {}, 400),
        ("POST", f"/pair/{number}/post", {"token": token, "phase": "pake",
                                          "body": "!!not base64!!"}, {}, 400),
        ("POST", f"/pair/{number}/post", {"token": token, "phase": "pake",
                                          "body": "A" * 20000}, {}, 413),
        ("POST", f"/pair/{number}/post", {"token": "0" * 32, "phase": "pake",
                                          "body": ""}, {}, 403),
        ("POST", f"/pair/{number}/post", {"phase": "pake", "body": ""}, {}, 403),
        ("POST", "/pair/abc/claim", {}, {}, 400),
        ("POST", "/pair/99999999/claim", {}, {}, 400),
        ("GET", f"/pair/{number}/fetch?after=x", None, {"X-Pair-Token": token}, 400),
        ("GET", f"/pair/{number}/fetch", None, {}, 403),
        ("POST", f"/pair/{number}/release", {"token": token, "outcome": "maybe"}, {}, 400),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, body, headers, status in cases:
            data = None if body is None else __import__("json").dumps(body)
            async with session.request(method, url + path, data=data,
                                       headers=headers) as resp:
                payload = await resp.json()
                assert resp.status == status, (path, body, payload)
                assert isinstance(payload.get("error"), str) and payload["error"]
    assert (len(store), store.version) == before


async def test_no_rendezvous_configured_is_a_config_error(tmp_path: Path) -> None:
    from node.errors import ConfigError

    a = Side(tmp_path, "alice", "http://127.0.0.1:1")
    a.service._rendezvous = []
    with pytest.raises(ConfigError, match="--bootstrap URL or pass --rendezvous"):
        await a.service.invite(emit=a.emit)
    with pytest.raises(ConfigError, match="--rendezvous"):
        await a.service.accept("7-crossover-eyetooth", emit=a.emit)
