"""Small helpers shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable

from node.errors import PeerNotTrusted
from node.identity import Identity, PeerId


def trusting(*ids: Identity) -> Callable[[PeerId], None]:
    """An `authorize` callback that trusts exactly these identities."""
    allowed = {i.peer_id for i in ids}

    def authorize(peer: PeerId) -> None:
        if peer not in allowed:
            raise PeerNotTrusted(f"{peer.short} not in trust list")

    return authorize
