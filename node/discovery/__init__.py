"""Discovery: how this node finds peers and tells them where it is.

* ``record``: our own signed contact record (seq, hosts, observed addresses, re-signing);
* ``addresses``: interface enumeration; a wildcard listen address is never advertised;
* ``bootstrap``: registration loops with the bootstrap servers;
* ``dht``: DHT join, record discovery of contacts, lookups (``locate``), stun;
* ``lan``: signed announcements by UDP broadcast/multicast on the local network;
* ``observed``: addresses seen from outside (bootstrap ``observed``, DHT ``stun``).

Each service takes its dependencies as arguments; node/daemon.py only wires them.
Imports node.contact, node.peerbook, node.identity, node.errors, node.wire; never the
daemon, the CLI, transfers or gossip.
"""
