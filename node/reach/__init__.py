"""Reach: how this node gets a channel to a peer whatever NATs sit between them.

* ``dialer.py``: the dial order per peer (the record's direct addresses with a
  short timeout, then a hole-punched udp path, then each relay it advertises)
  and which path won.
* ``punch.py`` (pure) and ``puncher.py`` (its driver): DCUtR-style udp hole
  punching coordinated inside an authenticated channel, and the punched paths
  that later dials use.
* ``relay_client.py``: keeping a reservation at a relay, joining circuits it
  announces, and dialling a peer through a relay.

Imports transports, identity, contact and the relay's wire messages
(bootstrap/relay_proto.py); nothing of the channel, peering or daemon.
"""

from __future__ import annotations

PATH_DIRECT = "direct"
PATH_HOLE_PUNCHED = "hole-punched"
PATH_RELAYED = "relayed"
