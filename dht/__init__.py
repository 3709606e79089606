"""Peer discovery through a hardened Kademlia DHT of signed contact records.

Public API: ``DhtNode`` and ``LookupResult`` (dht.node), ``PeerCache``
(dht.peercache). Lower layers: ``RecordStorage`` (dht.storage),
``HardenedProtocol`` (dht.protocol), ``RecordCrawl`` (dht.lookup),
``record_for_key`` (dht.records). Must not import node.daemon or the CLI.
"""

from __future__ import annotations

from dht.node import DhtNode, LookupResult
from dht.peercache import PeerCache

__all__ = ["DhtNode", "LookupResult", "PeerCache"]
