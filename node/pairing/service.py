"""The daemon's pairing service: one `node invite` or `node accept`, end to end.

Both sides run the same steps (``Step`` names them): post our SPAKE2 message, wait for
theirs, derive the keys, post our sealed box (confirmation MAC + identity offer), wait
for theirs, open it. A wrong code is caught at the MAC: this side reports ``failed`` to
the mailbox (which forgets the nameplate at once, so the other side fails too) and
raises WrongCode. Only a fully verified offer is trusted (``added_via="invite"``), and
its contact record goes into the peer book so `node ping` works at once.

The service gets everything as arguments (identity, trust store, a record getter, a
book adder); the daemon wires it. Imports node.pairing, identity, contact, trust, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from node.contact import ContactRecord
from node.errors import ConfigError, IdentityError, P2PError, ProtocolError
from node.identity import Identity, validate_name
from node.pairing import CodeExpired, PairingError, WrongCode
from node.pairing.code import Code, Entropy, make_code, parse_code
from node.pairing.mailbox import MailboxClient
from node.pairing.protocol import (
    APP_ID,
    SIDE_A,
    SIDE_B,
    PakeSide,
    PeerOffer,
    open_box,
    seal,
    verification_words,
)
from node.trust import TrustStore

log = logging.getLogger("p2pfs.pairing")

DEFAULT_INVITE_TTL_S = 600
MIN_INVITE_TTL_S = 5
MAX_INVITE_TTL_S = 3600
# once the other side showed up, the rest of the exchange must finish within this
EXCHANGE_TIMEOUT_S = 30.0
# a long poll lasts at most this; between polls the CLI gets a heartbeat (a CLI gone
# away, Ctrl-C, ends the invitation within one poll)
POLL_WAIT_S = 5.0
RELEASE_TIMEOUT_S = 1.0

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class Step(Enum):
    SENT_PAKE = "sent_pake"
    GOT_PAKE = "got_pake"
    SENT_BOX = "sent_box"
    VERIFIED = "verified"


@dataclass(frozen=True, slots=True)
class Exchanged:
    """A finished exchange: what the other side proved, and when both sides had met."""

    offer: PeerOffer
    met_at: float  # time.monotonic() when both PAKE messages were here
    code: Code


class PairingService:
    def __init__(self, identity: Identity, trust: TrustStore, *,
                 record: Callable[[], ContactRecord | None],
                 add_record: Callable[[ContactRecord], object],
                 rendezvous: list[str], entropy: Entropy = os.urandom,
                 exchange_timeout_s: float = EXCHANGE_TIMEOUT_S) -> None:
        self.identity = identity
        self.trust = trust
        self._record = record
        self._add_record = add_record
        self._rendezvous = list(rendezvous)
        self._entropy = entropy
        self.exchange_timeout_s = exchange_timeout_s

    def current_record(self) -> ContactRecord | None:
        """The contact record a box carries now (the node's current signed record)."""
        return self._record()

    def _url(self, override: str | None) -> str:
        if override:
            return override
        if not self._rendezvous:
            raise ConfigError("pairing needs a rendezvous: start the node with --bootstrap URL "
                              "or pass --rendezvous URL")
        return self._rendezvous[0]

    def _check_alias(self, alias: str) -> str:
        alias = validate_name(alias)
        if alias and any(t.alias == alias for t in self.trust.all()):
            raise IdentityError(f"alias {alias!r} already names a trusted peer; pick another "
                                "--name")
        return alias

    async def invite(self, *, alias: str = "", ttl_s: float = DEFAULT_INVITE_TTL_S,
                     rendezvous: str | None = None, emit: Emit) -> dict[str, Any]:
        alias = self._check_alias(alias)
        met = await self.exchange_as_inviter(ttl_s=ttl_s, rendezvous=rendezvous, emit=emit)
        return self._adopted(met, alias)

    async def accept(self, text: str, *, alias: str = "", rendezvous: str | None = None,
                     emit: Emit) -> dict[str, Any]:
        started = time.monotonic()
        code = parse_code(text)
        alias = self._check_alias(alias)
        met = await self.exchange_as_accepter(code, rendezvous=rendezvous, emit=emit)
        result = self._adopted(met, alias)
        result["accept_ms"] = round((time.monotonic() - started) * 1000, 1)
        return result

    def _adopted(self, met: Exchanged, alias: str) -> dict[str, Any]:
        result = self._adopt(met.offer, alias)
        # from the moment both PAKE messages were here to this side trusting the other
        result["exchange_ms"] = round((time.monotonic() - met.met_at) * 1000, 1)
        return result

    # -- the exchange alone: no trust (node/pairing/send.py builds one-shot sends on it) --
    async def exchange_as_inviter(self, *, ttl_s: float = DEFAULT_INVITE_TTL_S,
                                  rendezvous: str | None = None, emit: Emit,
                                  app_id: bytes = APP_ID, extra: Any = None) -> Exchanged:
        """Allocate a code, emit it (``{"type": "code"}``), run the exchange as side A."""
        if not MIN_INVITE_TTL_S <= ttl_s <= MAX_INVITE_TTL_S:
            raise ConfigError(f"option --expires must be {MIN_INVITE_TTL_S} s to "
                              f"{MAX_INVITE_TTL_S // 60} min, got {ttl_s:g} s")
        async with MailboxClient(self._url(rendezvous)) as mailbox:
            nameplate, token, expires_at = await mailbox.allocate(ttl_s)
            code = make_code(nameplate, entropy=self._entropy)
            await emit({"type": "code", "code": str(code), "expires_at": expires_at})
            return await self._run(mailbox, code, token, SIDE_A, expires_at, emit,
                                   app_id, extra)

    async def exchange_as_accepter(self, code: Code, *, rendezvous: str | None = None,
                                   emit: Emit, app_id: bytes = APP_ID,
                                   extra: Any = None) -> Exchanged:
        """Claim the code's nameplate and run the exchange as side B."""
        async with MailboxClient(self._url(rendezvous)) as mailbox:
            token, expires_at = await mailbox.claim(code.nameplate)
            deadline = min(expires_at, time.time() + self.exchange_timeout_s)
            return await self._run(mailbox, code, token, SIDE_B, deadline, emit, app_id,
                                   extra)

    async def _run(self, mailbox: MailboxClient, code: Code, token: str, side: str,
                   deadline: float, emit: Emit, app_id: bytes, extra: Any) -> Exchanged:
        pake = PakeSide(code, side, self._entropy, app_id)
        failed, release, cancelled = True, True, False
        met_at = 0.0
        try:
            await mailbox.post(code.nameplate, token, "pake", pake.outbound)
            step = Step.SENT_PAKE
            inbox: list[tuple[str, bytes]] = []
            theirs = await self._wait_for(mailbox, code, token, inbox, "pake", deadline, emit)
            step = Step.GOT_PAKE
            met_at = time.monotonic()
            await emit({"type": "connected"})
            deadline = time.time() + self.exchange_timeout_s
            keys = pake.finish(theirs)
            await mailbox.post(code.nameplate, token, "box",
                               seal(keys, self.identity, self.identity.name, self._record(),
                                    extra))
            step = Step.SENT_BOX
            box = await self._wait_for(mailbox, code, token, inbox, "box", deadline, emit)
            offer = open_box(keys, box)
            if offer.peer_id == self.identity.peer_id:
                raise ProtocolError("this is this node's own code")
            step = Step.VERIFIED
            failed = False
        except WrongCode:
            log.warning("pairing on nameplate %d failed: wrong code or a guess",
                        code.nameplate)
            raise
        except CodeExpired:
            release = False  # the mailbox expires it too, and tells a late side so
            raise
        except ProtocolError as exc:
            log.warning("pairing on nameplate %d failed: %s", code.nameplate, exc)
            raise
        except PairingError:
            cancelled = True  # a timeout: the other side is told we gave up, not "wrong code"
            raise
        except (ConnectionError, asyncio.CancelledError):
            # the CLI went away (Ctrl-C) or the node stops: the code dies with it
            log.info("pairing on nameplate %d cancelled", code.nameplate)
            cancelled = True
            raise
        finally:
            if release:
                with contextlib.suppress(P2PError, OSError, asyncio.CancelledError):
                    await asyncio.wait_for(mailbox.release(code.nameplate, token,
                                                           failed=failed, cancelled=cancelled),
                                           RELEASE_TIMEOUT_S)
        log.info("pairing on nameplate %d: %s", code.nameplate, step.value)
        return Exchanged(offer, met_at, code)

    async def _wait_for(self, mailbox: MailboxClient, code: Code, token: str,
                        inbox: list[tuple[str, bytes]], phase: str, deadline: float,
                        emit: Emit) -> bytes:
        """The other side's next message (pake, then box), long-polling; a fetch may bring
        both at once, so what came early waits in `inbox`."""
        index = 0 if phase == "pake" else 1
        while len(inbox) <= index:
            remaining = deadline - time.time()
            if remaining <= 0:
                if phase == "pake":
                    raise CodeExpired(f"code {code} expired before the other side used it")
                raise PairingError("the other side stopped answering; nobody was trusted")
            try:
                got = await mailbox.fetch(code.nameplate, token, len(inbox),
                                          min(POLL_WAIT_S, max(0.1, remaining)))
            except CodeExpired:
                raise CodeExpired(f"code {code} expired before the other side used it"
                                  ) from None
            inbox.extend(got[:2 - len(inbox)])
            if not got:
                await emit({"type": "waiting"})  # raises when the CLI went away
        got_phase, body = inbox[index]
        if got_phase != phase:
            raise ProtocolError(f"the rendezvous relayed a {got_phase!r} message where "
                                f"{phase!r} was due")
        return body

    def _adopt(self, offer: PeerOffer, alias: str) -> dict[str, Any]:
        entry = self.trust.trust(offer.peer_id, alias, added_via="invite")
        if offer.record is not None:
            self._add_record(offer.record)
        log.info("paired with %s (%s); trusted", offer.peer_id, offer.name or "unnamed")
        return {
            "peer_id": str(offer.peer_id),
            "fingerprint": offer.peer_id.fingerprint,
            "name": offer.name,
            "alias": entry.alias,
            "verification": verification_words(self.identity.public_key, offer.peer_id.key),
            "my_fingerprint": self.identity.peer_id.fingerprint,
        }


def parse_ttl(value: Any) -> float:
    """The control API's ``expires_s``: seconds, or the default when absent."""
    if value is None:
        return float(DEFAULT_INVITE_TTL_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError("option --expires must be a number of seconds")
    return float(value)
