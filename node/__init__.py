"""p2pfs node: identity, trust, secure channels, transfers, gossip, daemon and CLI."""

__version__ = "0.1.0"
