"""One-shot sends by a code (`node send PATH...` / `node receive CODE`), with no trust.

The two sides meet exactly as `node invite` / `node accept` do (service.py: the mailbox,
SPAKE2 on the code, key confirmation, boxes signed over the PAKE transcript), but under
their own purpose (SEND_APP_ID), so an invitation code fails here and a send code fails
there. The sender's box carries the offer: an id and, per file, its relative path, size
and BLAKE3 root hash (``SendOffer``). Nothing is added to either trust list; instead:

- the sender's daemon grants the receiver's key, in memory and for ACCEPT_TIMEOUT_S, the
  one service ``oneshot`` (node/peering.py ``ChannelGrants``), and serves on it exactly
  the offered files (path and root hash) to exactly that key;
- the receiver's daemon, once its user said yes, grants the sender's key the same
  service just long enough to open one channel to it, and fetches the offered files
  over that authenticated channel (direct or relayed, node/reach/dialer.py) with the
  ordinary transfer layer: chunk-verified, resumable, path-checked.

A broken transfer resumes: the receiver's partial files are named by file name and
root hash inside the target folder (node/transfer/store.py), and the default target
``<received dir>/from-<sender short id>`` depends only on the sender's key, so a new
code from the same sender for the same files finds the verified chunks again.

The channel protocol (service ``oneshot``, receiver -> sender): ``OneShotHello(offer
id, accept)``, the sender answers ``OneShotReady(ok, reason)``; after an accepting
hello the receiver sends a fetch-many request and the transfer session runs as for any
fetch. Imports node.pairing, peering, transfer (public API only), wire and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from node.contact import ContactRecord
from node.errors import (
    ChannelClosed,
    ConfigError,
    LocalIOError,
    P2PError,
    PeerError,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
)
from node.identity import PeerId
from node.notifications import FileReceived, Notice
from node.pairing import (
    ONESHOT_COMMANDS,
    ONESHOT_SERVICE,
    CodeCancelled,
    CodeExpired,
    CodeUsed,
    PairingError,
    WrongCode,
)
from node.pairing.code import parse_code
from node.pairing.protocol import MAX_BOX_BYTES, verification_words
from node.pairing.service import DEFAULT_INVITE_TTL_S, PairingService, parse_ttl
from node.peering import Peering
from node.transfer.manifest import SourceFile, build_manifest
from node.transfer.paths import safe_relpath, sanitize_label
from node.transfer.protocol import MAX_FILES_PER_FETCH
from node.transfer.session import (
    StopSignal,
    TransferProgress,
    TransferResult,
    TransferState,
    fetch_files,
    serve_fetch,
)
from node.transfer.store import ReceiveStore
from node.wire import Message, bound, decode_message, message, packb

log = logging.getLogger("p2pfs.send")

SEND_APP_ID = b"p2pfs-send-v1"
SERVICE = ONESHOT_SERVICE
OFFER_VERSION = 1
OFFER_ID_BYTES = 16
ROOT_HASH_BYTES = 32
MAX_OFFER_FILES = 64
MAX_FILE_SIZE_BYTES = 1 << 50
MAX_REASON_LEN = 200
# the receiver's user answers (and its daemon connects) within this; the sender's grant
# lives as long, so a receiver that never answers costs the sender nothing after it
ACCEPT_TIMEOUT_S = 300.0
DECIDE_TIMEOUT_S = ACCEPT_TIMEOUT_S - 10.0  # the receiver's pending offer dies first
# the receiver's grant: long enough to open one channel to the sender, no longer
CONNECT_GRANT_S = 30.0
HELLO_TIMEOUT_S = 10.0
WAIT_HEARTBEAT_S = 5.0
PROGRESS_EVERY_S = 0.2
RECEIVED_PREFIX = "from-"
MAX_STORES = 32  # target folders remembered (each knows its partial files in use)
WRONG_CODE_MESSAGE = ("wrong code or someone tried to guess it; nothing was sent (a code from "
                      "`node send` goes to `node receive`, one from `node invite` to "
                      "`node accept`)")
# what a name shown at the receive prompt may not hold: C0/C1 controls (U+009B is a CSI
# to some terminals) and the bidi controls that make "\u202egnp.exe" read "exe.png"
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                         "\u2066-\u2069]")
# the mailbox's advice on a used/expired code, which a send replaces with its own
INVITE_ADVICE = "make a new one with `node invite`"
# the sealed box: MAC, AEAD tag
_BOX_FIXED_BYTES = 32 + 16

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Notify = Callable[[Notice], Any]
CheckPath = Callable[[Path, str], None]


class SendDeclined(PairingError):
    """The receiver said no (or was not asked: nothing was sent)."""


class SendBroken(PeerError):
    """The transfer of a one-shot send broke off; a new code resumes it."""

    exit_code = 10


# -- the offer (inside the sender's sealed box) -----------------------------------------
@dataclass(frozen=True, slots=True)
class OfferedFile:
    path: str
    size: int
    root: bytes


@dataclass(frozen=True, slots=True)
class SendOffer:
    offer_id: bytes
    files: tuple[OfferedFile, ...]

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    def to_wire(self) -> list[Any]:
        return [OFFER_VERSION, self.offer_id, [[f.path, f.size, f.root] for f in self.files]]

    @classmethod
    def from_wire(cls, obj: Any) -> SendOffer:
        """Validate a peer-supplied offer: shape, counts, sizes, hashes, safe unique paths."""
        if (not isinstance(obj, list) or len(obj) != 3 or obj[0] != OFFER_VERSION
                or not isinstance(obj[1], bytes) or len(obj[1]) != OFFER_ID_BYTES
                or not isinstance(obj[2], list)):
            raise ProtocolError("the sender's offer has an unknown version or shape")
        if not 0 < len(obj[2]) <= MAX_OFFER_FILES:
            raise ProtocolError(f"the sender's offer names {len(obj[2])} files "
                                f"(1 to {MAX_OFFER_FILES} allowed)")
        files: list[OfferedFile] = []
        seen: set[str] = set()
        for item in obj[2]:
            if not isinstance(item, list) or len(item) != 3:
                raise ProtocolError("the sender's offer has a malformed file entry")
            path, size, root = item
            if not isinstance(path, str):
                raise ProtocolError("the sender's offer has a file without a name")
            safe_relpath(path)  # ProtocolError: absolute, .., empty parts, bad names
            if _UNSHOWABLE.search(path):
                raise ProtocolError(f"the sender's offer names a file with a control or "
                                    f"text-direction character: {ascii(path)[:80]}")
            if isinstance(size, bool) or not isinstance(size, int) \
                    or not 0 <= size <= MAX_FILE_SIZE_BYTES:
                raise ProtocolError(f"the sender's offer gives {path[:80]!r} a bad size")
            if not isinstance(root, bytes) or len(root) != ROOT_HASH_BYTES:
                raise ProtocolError(f"the sender's offer gives {path[:80]!r} a bad hash")
            if path in seen:
                raise ProtocolError(f"the sender's offer names {path[:80]!r} twice")
            seen.add(path)
            files.append(OfferedFile(path, size, root))
        return cls(obj[1], tuple(files))


def offer_fits(offer: SendOffer, record: ContactRecord | None, name: str,
               public_key: bytes) -> bool:
    """Whether the sealed box carrying `offer` stays within a rendezvous message."""
    body = packb([1, public_key, name, record.to_wire() if record is not None else None,
                  bytes(64), offer.to_wire()])
    return len(body) + _BOX_FIXED_BYTES <= MAX_BOX_BYTES


# -- the channel messages (service "oneshot") --------------------------------------------
@message("oneshot.hello")
class OneShotHello(Message):
    offer_id: bytes = field(metadata=bound(max_len=OFFER_ID_BYTES))
    accept: bool


@message("oneshot.ready")
class OneShotReady(Message):
    ok: bool
    reason: str = field(metadata=bound(max_len=MAX_REASON_LEN))


# -- the grant machine, pure: who may fetch what -----------------------------------------
class SendState(Enum):
    WAITING = "waiting"  # the exchange is done; the receiver's user decides
    SENDING = "sending"
    DONE = "done"
    DECLINED = "declined"
    FAILED = "failed"


@dataclass
class SendGrant:
    """The sender's side of one offer: exactly these files, to exactly this key."""

    offer: SendOffer
    receiver: PeerId
    sources: dict[str, tuple[Path, Path]]  # offered path -> (root folder, file)
    state: SendState = SendState.WAITING
    served: set[str] = field(default_factory=set)
    error: str = ""

    def check_hello(self, peer: PeerId, hello: OneShotHello) -> str:
        """'' when `peer` may go on with `hello`, else the reason it may not."""
        if peer != self.receiver:
            return "this offer was made to another key"
        if self.state is SendState.SENDING:
            # one channel per offer: a second one while the first serves would be served
            # on past the send's end, and its hello could flip the state under the first
            return "this offer is being sent on another channel already"
        if self.state is not SendState.WAITING:
            return f"this offer is {self.state.value}"
        if hello.offer_id != self.offer.offer_id:
            return "no such offer"
        return ""

    def resolve(self, rel_path: str, root_hash: bytes | None) -> tuple[Path, Path] | None:
        """Serve exactly the offered content: the path AND its root hash must match."""
        for f in self.offer.files:
            if f.path == rel_path and root_hash is not None and f.root == root_hash:
                return self.sources.get(rel_path)
        return None

    def _set_state(self, state: SendState, error: str = "") -> None:
        log.debug("one-shot offer %s: %s -> %s", self.offer.offer_id.hex()[:8],
                  self.state.value, state.value)
        self.state = state
        self.error = error or self.error

    def on_hello(self, accept: bool) -> None:
        self._set_state(SendState.SENDING if accept else SendState.DECLINED)

    def on_served(self, result: TransferResult) -> None:
        if result.state is TransferState.DONE:
            self.served |= {f.rel_path for f in result.files}
        if self.served >= {f.path for f in self.offer.files}:
            self._set_state(SendState.DONE)

    def on_broken(self, error: str) -> None:
        if self.state is not SendState.DONE:
            self._set_state(SendState.FAILED, error)

    @property
    def ended(self) -> bool:
        return self.state in (SendState.DONE, SendState.DECLINED, SendState.FAILED)


@dataclass
class PendingReceive:
    sender: PeerId
    name: str
    record: ContactRecord
    offer: SendOffer
    expires_at: float  # monotonic


# -- the service ---------------------------------------------------------------------------
@dataclass
class _LiveSend:
    grant: SendGrant
    emit: Emit
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_sent: int = 0
    # set when send() ends for any reason (done, declined, the CLI went away, the node
    # stops): the serving channel stops at once, so nothing flows past the grant's end
    stop: StopSignal = field(default_factory=StopSignal)


class OneShotService:
    def __init__(self, pairing: PairingService, peering: Peering, *, received_dir: Path,
                 check_path: CheckPath, notify: Notify,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pairing = pairing
        self.peering = peering
        self.received_dir = Path(received_dir)
        self._check_path = check_path
        self._notify = notify
        self._clock = clock
        self._sends: dict[bytes, _LiveSend] = {}
        self._receives: dict[str, PendingReceive] = {}
        # one store per target base: it knows which partial files a session holds, so two
        # receives of the same file (two codes at once) never write one partial together
        self._stores: dict[Path, ReceiveStore] = {}
        peering.register(SERVICE, self.handle_channel)

    def register(self, control: Any) -> None:
        for name, handler in self.commands().items():
            control.register(name, handler)

    def commands(self) -> dict[str, Callable[[dict[str, Any], Emit], Awaitable[Any]]]:
        """The control commands (node/pairing ONESHOT_COMMANDS) and their handlers."""
        handlers: dict[str, Callable[[dict[str, Any], Emit], Awaitable[Any]]] = {
            "send": self._cmd_send, "receive_offer": self._cmd_receive_offer,
            "receive_accept": self._cmd_receive_accept}
        assert tuple(handlers) == ONESHOT_COMMANDS
        return handlers

    # -- control commands (args are the CLI's; validated here) -------------------------
    async def _cmd_send(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        paths = args.get("paths")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError("send needs at least one path")
        return await self.send([Path(p) for p in paths], ttl_s=parse_ttl(args.get("expires_s")),
                               rendezvous=_text(args, "rendezvous") or None, emit=emit)

    async def _cmd_receive_offer(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        offer = await self.receive_offer(_text(args, "code"),
                                         rendezvous=_text(args, "rendezvous") or None,
                                         target=_text(args, "dir") or None, emit=emit)
        try:
            await emit({"type": "offered"})  # is the `node receive` that asked still there?
        except (ConnectionError, RuntimeError):
            # it went away (Ctrl-C) while the codes met: tell the sender no at once, rather
            # than leave it waiting ACCEPT_TIMEOUT_S for an answer nobody will give
            with contextlib.suppress(P2PError, OSError, TimeoutError):
                await self.receive_accept(offer["session"], accept=False, emit=_ignore)
            raise
        return offer

    async def _cmd_receive_accept(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        accept = args.get("accept")
        if not isinstance(accept, bool):
            raise ConfigError("receive_accept needs accept: true or false")
        return await self.receive_accept(_text(args, "session"), accept=accept,
                                         target=_text(args, "dir") or None, emit=emit)

    # -- sender ------------------------------------------------------------------------------
    async def send(self, paths: list[Path], *, ttl_s: float = DEFAULT_INVITE_TTL_S,
                   rendezvous: str | None = None, emit: Emit) -> dict[str, Any]:
        offer, sources = await asyncio.to_thread(self._prepare, paths)
        identity = self.pairing.identity
        if not offer_fits(offer, self.pairing.current_record(), identity.name, identity.public_key):
            raise ConfigError(f"{len(offer.files)} files (or their names) do not fit in one "
                              "send code's offer; pack them into one archive first, or pair "
                              "with `node invite` and use `node share`")
        try:
            met = await self.pairing.exchange_as_inviter(
                ttl_s=ttl_s, rendezvous=rendezvous, emit=emit, app_id=SEND_APP_ID,
                extra=offer.to_wire())
        except WrongCode:
            raise WrongCode(WRONG_CODE_MESSAGE) from None
        except (CodeUsed, CodeExpired, CodeCancelled) as exc:
            raise _for_send(exc, "run `node send` again for a new one") from None
        receiver = met.offer.peer_id
        grant = SendGrant(offer, receiver, sources)
        live = _LiveSend(grant, emit)
        permit = self.peering.grants.add(receiver, SERVICE, ACCEPT_TIMEOUT_S)
        self._sends[offer.offer_id] = live
        started = time.monotonic()
        log.info("one-shot send %s: offered %d file(s) to %s (no trust added; grant for %.0f s)",
                 offer.offer_id.hex()[:8], len(offer.files), receiver.short, ACCEPT_TIMEOUT_S)
        try:
            await emit({"type": "matched", "peer_id": str(receiver),
                        "fingerprint": receiver.fingerprint, "name": met.offer.name,
                        "verification": verification_words(identity.public_key,
                                                           receiver.key)})
            deadline = started + ACCEPT_TIMEOUT_S
            while grant.state is SendState.WAITING:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SendDeclined(f"the receiver did not answer within "
                                       f"{ACCEPT_TIMEOUT_S:.0f} s; nothing was sent")
                live.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(live.changed.wait(), min(left, WAIT_HEARTBEAT_S))
                if grant.state is SendState.WAITING:
                    await emit({"type": "waiting"})  # raises when the CLI went away
            while not grant.ended:
                live.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(live.changed.wait(), WAIT_HEARTBEAT_S)
                if live.stop.is_set():
                    raise SendBroken("the send was stopped (its `node send` went away); "
                                     "the receiver got only part of it")
                if not grant.ended:
                    await emit({"type": "waiting"})  # raises when the CLI went away
        finally:
            live.stop.set()  # a Ctrl-C'd `node send` stops the bytes too
            self.peering.grants.withdraw(permit)
            self._sends.pop(offer.offer_id, None)
        if grant.state is SendState.DECLINED:
            raise SendDeclined("the receiver declined the offer; nothing was sent")
        if grant.state is SendState.FAILED:
            raise SendBroken(f"the transfer to {receiver.short} broke: {grant.error}; run "
                             "`node send` again: `node receive` with the new code resumes "
                             "from the chunks it verified")
        elapsed = time.monotonic() - started
        return {"peer_id": str(receiver), "fingerprint": receiver.fingerprint,
                "name": met.offer.name, "state": grant.state.value,
                "files": [{"path": f.path, "size": f.size, "hash": f.root.hex()}
                          for f in offer.files],
                "bytes_total": offer.bytes_total, "bytes_sent": live.bytes_sent,
                "elapsed_s": round(elapsed, 3), "trusted": False}

    def _prepare(self, paths: list[Path]) -> tuple[SendOffer, dict[str, tuple[Path, Path]]]:
        """Manifests of the paths (blocking), each named relative to its own parent."""
        resolved = [p.expanduser().resolve() for p in paths]
        for p in resolved:
            if not p.exists():
                raise LocalIOError(f"{p} does not exist")
            if not (p.is_file() or p.is_dir()):
                raise LocalIOError(f"{p} is not a regular file or folder")
            self._check_path(p, "path")
        found: list[SourceFile] = []
        roots: dict[str, Path] = {}
        for p in resolved:
            for sf in build_manifest(p.parent, [p]):
                if sf.entry.path in roots:
                    raise ConfigError(f"two of the paths send the same name "
                                      f"{sf.entry.path!r}; send them separately")
                roots[sf.entry.path] = p.parent
                found.append(sf)
        if not found:
            raise LocalIOError("nothing to send: no regular file in the paths given")
        odd = [sf.entry.path for sf in found if _UNSHOWABLE.search(sf.entry.path)]
        if odd:  # a receiver refuses the whole offer for it, after the codes met
            raise ConfigError(f"cannot send {ascii(odd[0])[:100]}: its name holds a control "
                              "or text-direction character, which a receiver refuses; "
                              "rename it first")
        if len(found) > MAX_OFFER_FILES:
            raise ConfigError(f"{len(found)} files are more than one send code carries "
                              f"({MAX_OFFER_FILES}); pack them into an archive first")
        offer = SendOffer(os.urandom(OFFER_ID_BYTES), tuple(
            OfferedFile(sf.entry.path, sf.entry.size, sf.entry.root) for sf in found))
        return offer, {sf.entry.path: (roots[sf.entry.path], sf.abspath) for sf in found}

    async def handle_channel(self, channel: Any) -> None:
        """Service "oneshot": the receiver of one of our offers (the grant admitted it)."""
        hello = decode_message(await asyncio.wait_for(channel.recv(), HELLO_TIMEOUT_S),
                               expect=(OneShotHello,))
        live = self._sends.get(hello.offer_id)
        reason = "no such offer (it ended or expired)" if live is None else \
            live.grant.check_hello(channel.peer, hello)
        if reason or live is None:
            log.warning("one-shot channel from %s refused: %s", channel.peer.short, reason)
            await channel.send(OneShotReady(False, reason[:MAX_REASON_LEN]).encode())
            return
        grant = live.grant
        grant.on_hello(hello.accept)
        live.changed.set()
        await channel.send(OneShotReady(True, "").encode())
        if not hello.accept:
            return
        last = [0.0]

        async def tell(event: dict[str, Any]) -> None:
            try:
                await live.emit(event)
            except (ConnectionError, P2PError, RuntimeError):
                live.stop.set()  # the `node send` that asked went away (Ctrl-C): stop
                live.changed.set()

        def on_progress(p: TransferProgress) -> None:
            live.bytes_sent = p.bytes_done
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or p.bytes_done == p.bytes_total:
                last[0] = now
                asyncio.ensure_future(tell({
                    "type": "progress", "bytes_done": p.bytes_done,
                    "bytes_total": p.bytes_total, "file": p.file,
                    "files_done": p.files_done, "files_total": p.files_total}))

        try:
            result = await serve_fetch(channel, grant.resolve, progress=on_progress,
                                       cancel=live.stop)
            live.bytes_sent = result.bytes_sent_on_wire
            if result.state is not TransferState.DONE:
                grant.on_broken(result.error or result.state.value)
            else:
                grant.on_served(result)
        except P2PError as exc:
            grant.on_broken(str(exc))
            raise
        finally:
            if not grant.ended and grant.state is SendState.SENDING:
                grant.on_broken("the channel ended before every file was sent")
            live.changed.set()

    # -- receiver ------------------------------------------------------------------------------
    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, r in self._receives.items() if r.expires_at <= now]:
            del self._receives[key]

    async def receive_offer(self, text: str, *, rendezvous: str | None = None,
                            target: str | None = None, emit: Emit) -> dict[str, Any]:
        """Use a send code: run the exchange, keep the offer for DECIDE_TIMEOUT_S, show it.
        A `target` (--dir) is checked first, so a bad one leaves the code unused."""
        code = parse_code(text)
        if target:
            self.target(target, self.pairing.identity.peer_id)
        try:
            met = await self.pairing.exchange_as_accepter(code, rendezvous=rendezvous,
                                                          emit=emit, app_id=SEND_APP_ID)
        except WrongCode:
            raise WrongCode(WRONG_CODE_MESSAGE) from None
        except (CodeUsed, CodeExpired, CodeCancelled) as exc:
            raise _for_send(exc, "ask the sender for a new one (`node send`)") from None
        if met.offer.extra is None:
            raise ProtocolError("the other side offered no files")
        offer = SendOffer.from_wire(met.offer.extra)
        if met.offer.record is None:
            raise PeerUnreachable("the sender gave no contact record, so it cannot be reached")
        self._prune()
        session = os.urandom(8).hex()
        sender = met.offer.peer_id
        self._receives[session] = PendingReceive(sender, met.offer.name, met.offer.record,
                                                 offer, self._clock() + DECIDE_TIMEOUT_S)
        return {"session": session, "peer_id": str(sender), "fingerprint": sender.fingerprint,
                "name": met.offer.name,
                "verification": verification_words(self.pairing.identity.public_key, sender.key),
                "files": [{"path": f.path, "size": f.size} for f in offer.files],
                "bytes_total": offer.bytes_total,
                "default_dir": str(self.received_dir / self.default_label(sender)),
                "decide_within_s": DECIDE_TIMEOUT_S}

    @staticmethod
    def default_label(sender: PeerId) -> str:
        return RECEIVED_PREFIX + sender.short

    def target(self, text: str | None, sender: PeerId) -> tuple[Path, str]:
        """(base, folder name) the files land in: ``base/name/<offered path>``."""
        if not text:
            return self.received_dir, self.default_label(sender)
        d = Path(text)
        if not d.is_absolute():
            raise ConfigError("--dir must be an absolute path")
        d = d.resolve()
        if d.parent == d:
            raise ConfigError("--dir cannot be the root of the file system")
        self._check_path(d, "--dir")
        if sanitize_label(d.name, "") != d.name:
            raise ConfigError(f"--dir's last folder name {d.name!r} has characters a "
                              "received folder may not have; pick a plain name")
        if d.exists() and not d.is_dir():
            raise LocalIOError(f"--dir {d} is not a folder")
        return d.parent, d.name

    async def receive_accept(self, session: str, *, accept: bool, target: str | None = None,
                             emit: Emit) -> dict[str, Any]:
        self._prune()
        pending = self._receives.pop(session, None)
        if pending is None:
            raise PairingError("that offer is no longer pending (it was answered or it "
                               "expired); ask the sender for a new code")
        sender = pending.sender
        base, label, refused = self.received_dir, "", None
        if accept:
            try:
                base, label = self.target(target, sender)
            except P2PError as exc:  # the code is spent: tell the sender no, then say why
                refused, accept = exc, False
        permit = self.peering.grants.add(sender, SERVICE, CONNECT_GRANT_S)
        try:
            channel = await self.peering.connect(sender, SERVICE, record=pending.record)
        finally:
            self.peering.grants.withdraw(permit)  # the channel is open, or never will be
        # from the open channel to the verified copy, as a received share's rate counts
        started = time.monotonic()
        try:
            await channel.send(OneShotHello(pending.offer.offer_id, accept).encode())
            try:
                ready = decode_message(await asyncio.wait_for(channel.recv(), HELLO_TIMEOUT_S),
                                       expect=(OneShotReady,))
            except (TimeoutError, ChannelClosed):
                raise PeerUnreachable("the sender did not answer on the channel") from None
            if not ready.ok:
                raise PairingError(f"the sender refused: {ready.reason}")
            if refused is not None:
                raise refused
            if not accept:
                return {"peer_id": str(sender), "state": "declined", "files": []}
            channel.peer_name = label
            store = self._stores.get(base)
            if store is None:
                store = self._stores[base] = ReceiveStore(base)
                while len(self._stores) > MAX_STORES:
                    del self._stores[next(iter(self._stores))]
            try:
                result = await self._fetch(channel, pending.offer, store, emit)
            except RemoteError as exc:  # the sender's Abort ("changed", "cancelled")
                raise SendBroken(self._broke(sender, label, str(exc))) from None
        finally:
            await channel.close()
        saved = {f.rel_path: f for f in result.files}
        missing = [f.path for f in pending.offer.files if f.path not in saved]
        if result.state is not TransferState.DONE or missing:
            why = result.error or "; ".join(f"{p}: {r}" for p, r in result.failures) \
                or "not every file arrived"
            raise SendBroken(self._broke(sender, label, why))
        for f in result.files:
            self._notify(FileReceived(peer_id=str(sender), path=f.rel_path, size=f.size,
                                      hash=f.root_hex, saved_as=str(f.path) if f.path else "",
                                      transfer_id=result.transfer_id))
        elapsed = time.monotonic() - started
        total = pending.offer.bytes_total
        log.info("one-shot receive from %s: %d file(s), %d of %d bytes moved", sender.short,
                 len(result.files), result.bytes_received_payload, total)
        return {"peer_id": str(sender), "fingerprint": sender.fingerprint,
                "name": pending.name, "state": "done", "dir": str(base / label),
                "files": [{"path": f.rel_path, "size": f.size, "hash": f.root_hex,
                           "saved_as": str(f.path) if f.path else ""} for f in result.files],
                "bytes_total": total, "bytes_received": result.bytes_received_payload,
                "bytes_resumed": max(0, total - result.bytes_received_payload),
                "transport": getattr(channel, "transport", ""),
                "path": getattr(channel, "path", ""),
                "elapsed_s": round(elapsed, 3),
                "rate_bps": total / elapsed if elapsed > 0 else 0.0, "trusted": False}

    @staticmethod
    def _broke(sender: PeerId, label: str, why: str) -> str:
        # the transfer layer names the peer by the channel's label, which for a one-shot
        # receive is the target folder's name ("inbox aborted the transfer"): say who
        why = why.replace(f"{label} aborted", f"the sender {sender.short} stopped")
        return (f"the transfer from {sender.short} broke: {why}; ask for a new code for "
                "the same files: it resumes from the verified chunks")

    async def _fetch(self, channel: Any, offer: SendOffer, store: ReceiveStore,
                     emit: Emit) -> TransferResult:
        last = [0.0]
        stop = StopSignal()

        async def tell(event: dict[str, Any]) -> None:
            try:
                await emit(event)
            except (ConnectionError, P2PError, RuntimeError):
                stop.set()  # the `node receive` that asked went away (Ctrl-C): stop; the
                # verified chunks stay, so a new code for the same files resumes

        def on_progress(p: TransferProgress) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or p.bytes_done == p.bytes_total:
                last[0] = now
                asyncio.ensure_future(tell({
                    "type": "progress", "bytes_done": p.bytes_done,
                    "bytes_total": p.bytes_total, "file": p.file,
                    "files_done": p.files_done, "files_total": p.files_total}))

        assert len(offer.files) <= MAX_FILES_PER_FETCH
        return await fetch_files(channel, [(f.path, f.root) for f in offer.files], store,
                                 progress=on_progress, cancel=stop)


def _for_send(exc: PairingError, advice: str) -> PairingError:
    """The mailbox's words are for invitations; a send code's user needs a send's advice."""
    return type(exc)(str(exc).replace(INVITE_ADVICE, advice))


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be text")
    return value


async def _ignore(_event: dict[str, Any]) -> None:
    return None


async def _emit_quietly(emit: Emit, event: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, P2PError, RuntimeError):
        await emit(event)
