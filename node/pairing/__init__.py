"""Pairing: trust a peer by a short one-time code (`node invite` / `node accept`).

    code.py      the code format: <nameplate>-<odd word>-<even word> (PGP word list)
    protocol.py  pure crypto: SPAKE2 on the code, HKDF keys, key confirmation, the sealed
                 identity box, the verification string (randomness injectable)
    mailbox.py   HTTP client of the rendezvous mailbox (bootstrap/mailbox.py)
    service.py   the daemon's pairing service: runs one invite or accept end to end

The rendezvous sees only nameplates, SPAKE2 messages and ciphertext. Imports identity,
contact, trust and errors; never the daemon.

This module itself imports only node.errors: the daemon names the services and commands
below without loading the pairing code (spake2 included), which it imports at the first
invite, accept, send or receive, or the first "oneshot" channel a peer opens.
"""

from __future__ import annotations

from node.errors import P2PError

ONESHOT_SERVICE = "oneshot"  # the channel service of `node send` (send.py)
PAIRING_COMMANDS = ("invite", "accept")  # service.py, through the daemon
ONESHOT_COMMANDS = ("send", "receive_offer", "receive_accept")  # send.py OneShotService


class PairingError(P2PError):
    """A pairing (invite/accept) did not complete; nobody was trusted."""

    exit_code = 16


class WrongCode(PairingError):
    """The two sides did not type the same code (or a third party guessed and lost)."""

    def __init__(self, msg: str = "wrong code or someone tried to guess it; "
                                   "nobody was trusted, make a new code with `node invite`"
                 ) -> None:
        super().__init__(msg)


class CodeExpired(PairingError):
    """The code's time ran out before the other side used it."""


class CodeCancelled(PairingError):
    """The other side gave up on the code (its CLI was interrupted, or it timed out)."""


class CodeUsed(PairingError):
    """The code was already used (or never existed): each code works once."""


__all__ = ["CodeCancelled", "CodeExpired", "CodeUsed", "PairingError", "WrongCode"]
