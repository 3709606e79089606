"""HTTP client of the pairing mailbox (bootstrap/mailbox.py).

Everything the mailbox says is untrusted: answers are size-capped and shape-checked,
and nothing it relays is believed until the PAKE confirmation checks out (protocol.py).
Refusals map to the pairing errors once, here: 410 ``failed`` -> WrongCode, ``used`` or
an unknown nameplate -> CodeUsed, ``expired`` -> CodeExpired, ``cancelled`` ->
CodeCancelled; a network failure or 5xx -> PeerUnreachable naming the URL; any other
4xx -> ProtocolError.
Imports errors and node.pairing only; must not import the server module.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any, Self

from node.config import is_bootstrap_url
from node.errors import PeerUnreachable, ProtocolError
from node.pairing import CodeCancelled, CodeExpired, CodeUsed, WrongCode

if TYPE_CHECKING:
    import aiohttp

MAX_ANSWER_BYTES = 64 * 1024
MAX_MESSAGES = 4
MAX_MESSAGE_BYTES = 4096
TOKEN_HEX_LEN = 32
REQUEST_TIMEOUT_S = 10.0
MAX_ERROR_TEXT_LEN = 200


class MailboxClient:
    def __init__(self, url: str, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if not is_bootstrap_url(url):
            raise ProtocolError(f"rendezvous URL {url!r} must look like http://host:port")
        self.url = url.strip().rstrip("/")
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                       params: dict[str, str] | None = None,
                       headers: dict[str, str] | None = None,
                       extra_timeout_s: float = 0.0) -> dict[str, Any]:
        # aiohttp is imported on first use: an idle node that never pairs does not load it
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self._timeout_s + extra_timeout_s)
        data = None if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        try:
            async with self._session.request(method, self.url + path, data=data,
                                             params=params, headers=hdrs,
                                             timeout=timeout) as resp:
                raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = str(exc) or exc.__class__.__name__
            raise PeerUnreachable(f"rendezvous {self.url} unreachable: {reason}") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise ProtocolError(f"rendezvous {self.url} sent an oversize answer")
        try:
            payload = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            if status >= 500:
                raise PeerUnreachable(f"rendezvous {self.url} answered {status}")
            raise ProtocolError(f"rendezvous {self.url} sent an answer that is not JSON")
        if 200 <= status < 300:
            return payload
        text = str(payload.get("error", ""))[:MAX_ERROR_TEXT_LEN]
        why = payload.get("reason")
        if status == 410 and why == "failed":
            raise WrongCode()
        if status == 410 and why == "cancelled":
            raise CodeCancelled("the other side gave up on this code (interrupted or timed out); "
                              "make a new one with `node invite`")
        if status == 410 and why == "expired":
            raise CodeExpired("this code has expired; make a new one with `node invite`")
        if (status == 410 and why == "used") or (status == 409 and why == "used") \
                or status == 404 and path.startswith("/pair/") and why == "unknown":
            raise CodeUsed("this code was already used, or never existed (each code works "
                           "once); make a new one with `node invite`")
        if status == 404:
            raise ProtocolError(f"rendezvous {self.url} has no pairing mailbox (404)")
        if status >= 500:
            raise PeerUnreachable(f"rendezvous {self.url} answered {status}: {text}")
        raise ProtocolError(f"rendezvous {self.url} answered {status} to {method} {path}: "
                            f"{text}")

    # -- API --------------------------------------------------------------
    async def allocate(self, ttl_s: float) -> tuple[int, str, float]:
        ans = await self._request("POST", "/pair/allocate", body={"ttl_s": ttl_s})
        number, token, expires = ans.get("nameplate"), ans.get("token"), ans.get("expires_at")
        if type(number) is not int or not 0 < number < 10**6:
            raise ProtocolError(f"rendezvous {self.url} sent a bad nameplate")
        return number, _token(token, self.url), _time(expires, self.url)

    async def claim(self, nameplate: int) -> tuple[str, float]:
        ans = await self._request("POST", f"/pair/{nameplate}/claim", body={})
        return _token(ans.get("token"), self.url), _time(ans.get("expires_at"), self.url)

    async def post(self, nameplate: int, token: str, phase: str, body: bytes) -> None:
        await self._request("POST", f"/pair/{nameplate}/post", body={
            "token": token, "phase": phase, "body": base64.b64encode(body).decode("ascii")})

    async def fetch(self, nameplate: int, token: str, after: int, wait_s: float
                    ) -> list[tuple[str, bytes]]:
        ans = await self._request("GET", f"/pair/{nameplate}/fetch",
                                  params={"after": str(after), "wait": f"{wait_s:.1f}"},
                                  headers={"X-Pair-Token": token}, extra_timeout_s=wait_s)
        items = ans.get("messages")
        if not isinstance(items, list) or len(items) > MAX_MESSAGES:
            raise ProtocolError(f"rendezvous {self.url} sent a bad message list")
        out = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("phase"), str) \
                    or not isinstance(item.get("body"), str) \
                    or len(item["body"]) > 2 * MAX_MESSAGE_BYTES:
                raise ProtocolError(f"rendezvous {self.url} sent a malformed message")
            try:
                out.append((item["phase"], base64.b64decode(item["body"], validate=True)))
            except (binascii.Error, ValueError):
                raise ProtocolError(f"rendezvous {self.url} sent a malformed message") from None
        return out

    async def release(self, nameplate: int, token: str, *, failed: bool,
                      cancelled: bool = False) -> None:
        outcome = "cancelled" if cancelled else "failed" if failed else "ok"
        await self._request("POST", f"/pair/{nameplate}/release",
                            body={"token": token, "outcome": outcome})


def _token(value: Any, url: str) -> str:
    if not isinstance(value, str) or len(value) != TOKEN_HEX_LEN:
        raise ProtocolError(f"rendezvous {url} sent a bad side token")
    return value


def _time(value: Any, url: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"rendezvous {url} sent a bad expiry")
    return float(value)
