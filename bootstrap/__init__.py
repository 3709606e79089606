"""Bootstrap registration: a tiny aiohttp + SQLite server where nodes find their first peers.

This package holds the server (``bootstrap.server``), its SQLite registry
(``bootstrap.store``) and the node-side client (``bootstrap.client``). This
``__init__`` only defines what server and client must agree on: limits and the
canonical bytes of a signed unregister request. It is imported by both sides,
so it must stay light: it imports nothing of aiohttp and nothing of the node
above ``node.identity``/``node.wire``.
"""

from __future__ import annotations

from node.identity import PeerId
from node.wire import packb

UNREGISTER_DOMAIN = "p2pfs-unregister-v1"
# a signed unregister request is accepted this far from the server's clock
UNREGISTER_WINDOW_S = 300
DEFAULT_PORT = 8470
DEFAULT_TTL_S = 300.0
MAX_BODY_BYTES = 16 * 1024
MAX_DEVICE_ID_LEN = 128
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000


def unregister_message(peer_id: PeerId, timestamp: int) -> bytes:
    """The bytes a peer signs to remove its registration: msgpack [DOMAIN, key, timestamp]."""
    return packb([UNREGISTER_DOMAIN, peer_id.key, timestamp])


__all__ = [
    "DEFAULT_PAGE_LIMIT",
    "DEFAULT_PORT",
    "DEFAULT_TTL_S",
    "MAX_BODY_BYTES",
    "MAX_DEVICE_ID_LEN",
    "MAX_PAGE_LIMIT",
    "UNREGISTER_DOMAIN",
    "UNREGISTER_WINDOW_S",
    "unregister_message",
]
