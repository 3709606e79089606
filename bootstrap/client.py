"""Node-side client of the bootstrap registration server.

``BootstrapClient(url)`` registers this node's signed contact record, lists
online peers and unregisters with a signed request. Everything the server
sends is untrusted: response sizes are capped, shapes checked, and every
contact record is verified (signature, expiry, peer id match) before it is
returned; invalid entries are dropped, never raised. A network failure or a
5xx raises ``PeerUnreachable``; a 4xx or a malformed answer raises
``ProtocolError``; both name the URL.

Speaks HTTP through bootstrap/http_lite.py (asyncio streams, one request per
connection), not aiohttp: a running node then carries none of aiohttp's ~8.6 MB.
Must not import the daemon, the DHT, the server module or aiohttp.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import time
from typing import Any, Self
from urllib.parse import quote

from bootstrap import MAX_DEVICE_ID_LEN, MAX_PAGE_LIMIT, http_lite, unregister_message
from node.config import is_bootstrap_url
from node.contact import ContactRecord
from node.errors import P2PError, PeerUnreachable, ProtocolError
from node.identity import Identity

log = logging.getLogger("p2pfs.bootstrap.client")

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_LIST_PEERS = 100_000
MAX_PAGES = 1000
MAX_ERROR_TEXT_LEN = 200


class BootstrapClient:
    """Talks to one bootstrap server. Close it (or use ``async with``)."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        if not is_bootstrap_url(url):
            raise ProtocolError(f"bootstrap URL {url!r} must look like http://host:port")
        self.url = url.strip().rstrip("/")
        self._timeout_s = timeout_s
        # the source address the server saw on our last registration (its "observed")
        self.observed: tuple[str, int] | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing to release: each request has its own connection."""

    async def _request(self, method: str, path: str, *, body: Any = None,
                       params: dict[str, str] | None = None) -> Any:
        url = self.url + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            resp = await http_lite.request(method, url, body=data, params=params,
                                           headers=headers, timeout_s=self._timeout_s,
                                           max_body_bytes=MAX_RESPONSE_BYTES)
        except http_lite.HttpBodyTooLarge:
            raise ProtocolError(f"bootstrap server answer from {url} is over "
                                f"{MAX_RESPONSE_BYTES} bytes") from None
        except http_lite.HttpProtocolError as exc:
            raise PeerUnreachable(f"bootstrap server {self.url} unreachable: {exc}") from None
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or exc.__class__.__name__
            raise PeerUnreachable(f"bootstrap server {self.url} unreachable: {reason}") from None
        raw, status = resp.body, resp.status
        try:
            payload = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            payload = None
            if 200 <= status < 300:
                raise ProtocolError(f"bootstrap server {self.url} sent invalid JSON") from None
        if not 200 <= status < 300:
            reason = ""
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                reason = payload["error"][:MAX_ERROR_TEXT_LEN]
            text = f"bootstrap server {self.url} answered {status} to {method} {path}"
            text += f": {reason}" if reason else ""
            if status >= 500:
                raise PeerUnreachable(text)
            raise ProtocolError(text)
        return payload

    # -- API ------------------------------------------------------------------
    async def register(self, record: ContactRecord) -> list[ContactRecord]:
        """Register (or refresh) our record; returns the other peers' verified records."""
        payload = await self._request(
            "POST", "/register",
            body={"device_id": str(record.peer_id), "record": record.to_json()})
        if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
            raise ProtocolError(f"bootstrap server {self.url}: register answer has no records")
        self.observed = _observed(payload.get("observed"))
        now = time.time()
        out: list[ContactRecord] = []
        for raw in payload["records"]:
            peer = _verified_record(raw, now)
            if peer is not None and peer.peer_id != record.peer_id:
                out.append(peer)
        return out

    async def unregister(self, identity: Identity) -> None:
        """Remove our registration with a signed request; not being registered is fine."""
        timestamp = int(time.time())
        signature = identity.sign(unregister_message(identity.peer_id, timestamp))
        path = "/register/" + quote(identity.peer_id.compact, safe="")
        try:
            await self._request("DELETE", path, body={
                "timestamp": timestamp,
                "signature": base64.b64encode(signature).decode("ascii")})
        except ProtocolError as exc:
            if " answered 404 " in str(exc):
                return
            raise

    async def list_peers(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Online registrations, following cursors, at most ``limit`` entries.

        Each entry is ``{"device_id": str, "record": ContactRecord | None,
        "last_seen": float}``; a record is verified and matches device_id, else
        the entry is dropped.
        """
        limit = max(0, min(limit, MAX_LIST_PEERS))
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        now = time.time()
        for _ in range(MAX_PAGES):
            if len(out) >= limit:
                break
            params = {"limit": str(min(MAX_PAGE_LIMIT, limit - len(out)))}
            if cursor is not None:
                params["cursor"] = cursor
            payload = await self._request("GET", "/peers", params=params)
            if not isinstance(payload, dict) or not isinstance(payload.get("peers"), list):
                raise ProtocolError(f"bootstrap server {self.url}: /peers answer has no peers")
            for item in payload["peers"][:MAX_PAGE_LIMIT]:
                entry = _peer_entry(item, now)
                if entry is not None:
                    out.append(entry)
            nxt = payload.get("next_cursor")
            if nxt is None or not payload["peers"]:
                break
            if not isinstance(nxt, str) or len(nxt) > 512 or nxt == cursor:
                raise ProtocolError(f"bootstrap server {self.url}: bad next_cursor")
            cursor = nxt
        return out[:limit]


def _observed(raw: Any) -> tuple[str, int] | None:
    """The answer's ``observed`` source address, or None when absent or malformed."""
    if not isinstance(raw, dict):
        return None
    host, port = raw.get("host"), raw.get("port")
    if not isinstance(host, str) or type(port) is not int or not 0 < port <= 65535:
        return None
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return None


def _verified_record(raw: Any, now: float) -> ContactRecord | None:
    try:
        return ContactRecord.from_json(raw).verify(now)
    except (P2PError, ValueError, TypeError) as exc:
        log.debug("dropping invalid contact record from bootstrap server: %s", exc)
        return None


def _peer_entry(item: Any, now: float) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    device_id, raw_record, last_seen = item.get("device_id"), item.get("record"), item.get(
        "last_seen")
    if not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID_LEN:
        return None
    if isinstance(last_seen, bool) or not isinstance(last_seen, (int, float)):
        return None
    record = None
    if raw_record is not None:
        record = _verified_record(raw_record, now)
        if record is None or str(record.peer_id) != device_id:
            return None
    return {"device_id": device_id, "record": record, "last_seen": float(last_seen)}
