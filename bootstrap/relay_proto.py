"""The relay's wire messages and the bytes a reservation signs (pure: no sockets, no clock).

Every control message travels as one tcp-transport frame (u32 big-endian
length + msgpack ``[type, version, fields...]``, as ``node/wire.py``), at most
``MAX_CONTROL_BYTES`` long. After ``Spliced`` the same TCP connection carries
the two peers' own frames untouched (the relay copies bytes, it never parses
them again). Protocol description: docs/protocols/relay.md.

Imports only node.wire, node.identity and node.errors; imported by the relay
server (bootstrap/relay.py) and the node's relay client (node/reach/relay_client.py).
"""

from __future__ import annotations

from dataclasses import field

from node.wire import Message, bound, message, packb

RELAY_PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1024
NONCE_BYTES = 32
TOKEN_BYTES = 32
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_REASON_BYTES = 200
RESERVE_DOMAIN = "p2pfs-relay-reserve-v1"

# error codes (RelayError.code), after libp2p circuit v2's status names
E_MALFORMED = "malformed"
E_RESERVATION_REFUSED = "reservation-refused"
E_RESOURCE_LIMIT = "resource-limit-exceeded"
E_NO_RESERVATION = "no-reservation"
E_CONNECTION_FAILED = "connection-failed"
E_PERMISSION_DENIED = "permission-denied"
E_BAD_TOKEN = "bad-token"


def _exact(n: int) -> dict[str, int | None]:
    return bound(max_len=n)


# -- reservation (the node that wants to be reachable) -------------------------------
@message("rly-reserve")
class Reserve(Message):
    """First message of a control connection: reserve a slot for this public key."""

    peer_key: bytes = field(metadata=_exact(KEY_BYTES))

    def validate(self) -> None:
        _check_len("rly-reserve", "peer_key", self.peer_key, KEY_BYTES)


@message("rly-challenge")
class Challenge(Message):
    nonce: bytes = field(metadata=_exact(NONCE_BYTES))

    def validate(self) -> None:
        _check_len("rly-challenge", "nonce", self.nonce, NONCE_BYTES)


@message("rly-proof")
class Proof(Message):
    """Ed25519 signature of ``reserve_signed_bytes(nonce, peer_key)``."""

    signature: bytes = field(metadata=_exact(SIGNATURE_BYTES))

    def validate(self) -> None:
        _check_len("rly-proof", "signature", self.signature, SIGNATURE_BYTES)


@message("rly-reserved")
class Reserved(Message):
    """The reservation holds for ``ttl_s`` unless renewed; each circuit is limited."""

    ttl_s: int = field(metadata=bound(max_val=86400))
    max_circuit_bytes: int = field(metadata=bound(max_val=2**62))
    max_circuit_s: int = field(metadata=bound(max_val=86400 * 30))
    max_circuits: int = field(metadata=bound(max_val=65536))


@message("rly-renew")
class Renew(Message):
    """Keep the reservation (and the NAT mapping of the control connection) alive."""


@message("rly-incoming")
class Incoming(Message):
    """Relay -> reservation holder: a peer wants a circuit; join it with this token."""

    token: bytes = field(metadata=_exact(TOKEN_BYTES))

    def validate(self) -> None:
        _check_len("rly-incoming", "token", self.token, TOKEN_BYTES)


@message("rly-join")
class Join(Message):
    """First message of the reservation holder's data connection."""

    token: bytes = field(metadata=_exact(TOKEN_BYTES))

    def validate(self) -> None:
        _check_len("rly-join", "token", self.token, TOKEN_BYTES)


# -- connecting (the dialer) ------------------------------------------------------------
@message("rly-connect")
class Connect(Message):
    """First message of a dialer's connection: splice me to the holder of ``peer_key``."""

    peer_key: bytes = field(metadata=_exact(KEY_BYTES))

    def validate(self) -> None:
        _check_len("rly-connect", "peer_key", self.peer_key, KEY_BYTES)


@message("rly-spliced")
class Spliced(Message):
    """Both legs are joined: from the next byte on, this connection is the other peer's."""

    max_circuit_bytes: int = field(metadata=bound(max_val=2**62))
    max_circuit_s: int = field(metadata=bound(max_val=86400 * 30))


@message("rly-error")
class RelayError(Message):
    """The relay refuses; it closes the connection after sending this."""

    code: str = field(metadata=bound(max_len=32))
    reason: str = field(metadata=bound(max_len=MAX_REASON_BYTES))


FIRST_MESSAGES: tuple[type[Message], ...] = (Reserve, Connect, Join)


def reserve_signed_bytes(nonce: bytes, peer_key: bytes) -> bytes:
    """What a reservation proof signs: the relay's fresh nonce binds it to this connection."""
    return packb([RESERVE_DOMAIN, nonce, peer_key])


def _check_len(msg: str, name: str, value: bytes, n: int) -> None:
    from node.errors import ProtocolError

    if len(value) != n:
        raise ProtocolError(f"{msg}.{name}: must be {n} bytes, got {len(value)}")
