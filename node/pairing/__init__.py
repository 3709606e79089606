"""Pairing: trust a peer by a short one-time code (`node invite` / `node accept`).

    code.py      the code format: <nameplate>-<odd word>-<even word> (PGP word list)
    protocol.py  pure crypto: SPAKE2 on the code, HKDF keys, key confirmation, the sealed
                 identity box, the verification string (randomness injectable)
    mailbox.py   HTTP client of the rendezvous mailbox (bootstrap/mailbox.py)
    service.py   the daemon's pairing service: runs one invite or accept end to end

The rendezvous sees only nameplates, SPAKE2 messages and ciphertext. Imports identity,
contact, trust and errors; never the daemon.
"""

from __future__ import annotations

from node.errors import P2PError


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
