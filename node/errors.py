"""The one exception tree of p2pfs, named for what the caller can do.

    P2PError                      root; `str(err)` is a one-line message for a person
    ├── ConfigError               a config file, env var or flag is wrong (names file and key)
    ├── IdentityError             no identity, or one exists and would be overwritten
    ├── LocalIOError              our own disk/filesystem failed (disk full, not writable)
    ├── NodeNotRunning            the CLI found no daemon on the control socket
    ├── NodeAlreadyRunning        a second daemon on the same home dir
    ├── PeerError                 something about another peer
    │   ├── UnknownPeer           an id/prefix/alias matches no peer, or several
    │   ├── PeerNotTrusted        the peer is not on the trust list
    │   ├── PeerUnreachable       offline, timed out, refused, transport not offered
    │   ├── ChannelClosed         the channel ended (peer closed, idle timeout, reset)
    │   └── RemoteError           the peer answered with an error of its own
    ├── ProtocolError             a peer (or file) broke the wire rules: bad frame, bad type,
    │   │                         oversize field, bad signature, replay
    │   └── HandshakeError        the authenticated key exchange failed
    ├── IntegrityError            data does not match its hash
    └── Cancelled                 the user cancelled the operation

The CLI maps each class to an exit code in one place (`EXIT_CODES`).
This module imports nothing of the project.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base of every expected p2pfs failure."""

    exit_code = 1


class ConfigError(P2PError):
    exit_code = 2


class IdentityError(P2PError):
    exit_code = 3


class LocalIOError(P2PError):
    exit_code = 4


class NodeNotRunning(P2PError):
    exit_code = 5

    def __init__(self, msg: str = "node is not running; start it with `node start`") -> None:
        super().__init__(msg)


class NodeAlreadyRunning(P2PError):
    exit_code = 6


class PeerError(P2PError):
    exit_code = 7


class UnknownPeer(PeerError):
    exit_code = 8


class PeerNotTrusted(PeerError):
    exit_code = 9


class PeerUnreachable(PeerError):
    exit_code = 10


class ChannelClosed(PeerError):
    exit_code = 10


class RemoteError(PeerError):
    exit_code = 11


class ProtocolError(P2PError):
    exit_code = 12


class HandshakeError(ProtocolError):
    exit_code = 13


class IntegrityError(P2PError):
    exit_code = 14


class Cancelled(P2PError):
    exit_code = 15


# error name on the wire / control API -> class, so an error raised in the daemon
# reaches the CLI as the same class and the same exit code
ERROR_CLASSES: dict[str, type[P2PError]] = {
    cls.__name__: cls
    for cls in (
        P2PError,
        ConfigError,
        IdentityError,
        LocalIOError,
        NodeNotRunning,
        NodeAlreadyRunning,
        PeerError,
        UnknownPeer,
        PeerNotTrusted,
        PeerUnreachable,
        ChannelClosed,
        RemoteError,
        ProtocolError,
        HandshakeError,
        IntegrityError,
        Cancelled,
    )
}
