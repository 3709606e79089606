"""The one exception tree of p2pfs, named for what the caller can do.

    P2PError                      root; `str(err)` is a one-line message for a person
    ├── ConfigError               a config file, env var or flag is wrong (names file and key)
    ├── IdentityError             no identity, or one exists and would be overwritten
    ├── LocalIOError              our own disk/filesystem failed (disk full, not writable)
    │   └── PortUnavailable       a port cannot be bound: in use, privileged, no such address
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

Each class carries its exit code (`exit_code`, inherited by subclasses that set none).
Errors cross the control socket by name: `error_lineage` gives the names of an error's
class and its ancestors, `error_class` walks them back to the most specific class this
process knows, so a subclass defined in a module the CLI never imports still exits with
its ancestor's code. `bind_errors` is the one place an OSError from binding a listening
socket becomes a `PortUnavailable`.
This module imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator, Sequence

# error name on the wire / control API -> class, so an error raised in the daemon
# reaches the CLI as the same class and the same exit code. Every subclass of P2PError
# registers itself here when its module is imported (the first class of a name wins).
ERROR_CLASSES: dict[str, type[P2PError]] = {}


class P2PError(Exception):
    """Base of every expected p2pfs failure."""

    exit_code = 1

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        ERROR_CLASSES.setdefault(cls.__name__, cls)

    @classmethod
    def from_message(cls, message: str) -> P2PError:
        """Rebuild an error that arrived by name and message, whatever __init__ takes."""
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        return exc


ERROR_CLASSES[P2PError.__name__] = P2PError


class ConfigError(P2PError):
    exit_code = 2


class IdentityError(P2PError):
    exit_code = 3


class LocalIOError(P2PError):
    exit_code = 4


class PortUnavailable(LocalIOError):
    """A listening socket cannot be bound. `option` names what changes the port, or the
    address when `bad_address` (not this machine's, or a name that does not resolve)."""

    def __init__(self, service: str, host: str, port: int, reason: str, option: str = "", *,
                 bad_address: bool = False) -> None:
        self.service, self.host, self.port = service, host, port
        self.reason, self.option, self.bad_address = reason, option, bad_address
        hint = f"; use another with {option}" if option else ""
        super().__init__(f"cannot listen on {service} port {port} ({host}): {reason}{hint}")

    def naming(self, option: str) -> PortUnavailable:
        """The same error, with the flag or config key that changes the port (or address)."""
        return PortUnavailable(self.service, self.host, self.port, self.reason, option,
                               bad_address=self.bad_address)


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


def error_lineage(exc: P2PError) -> list[str]:
    """The names of exc's class and its P2PError ancestors, most specific first."""
    return [c.__name__ for c in type(exc).__mro__ if issubclass(c, P2PError)]


def error_class(names: Sequence[str]) -> type[P2PError]:
    """The most specific class this process knows of a lineage from `error_lineage`."""
    for name in names:
        cls = ERROR_CLASSES.get(name) if isinstance(name, str) else None
        if cls is not None:
            return cls
    return P2PError


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError nothing mapped closer to its cause: what failed, on what."""
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


_BIND_REASONS = {
    errno.EADDRINUSE: "the port is already in use",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's",
}


def _os_error_of(exc: OSError) -> OSError:
    """exc, or the OSError with an errno that it wraps (uvloop raises a bare OSError for
    a UDP bind, with the real one as its context)."""
    seen: BaseException | None = exc
    while isinstance(seen, OSError):
        if seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


@contextlib.contextmanager
def bind_errors(service: str, host: str, port: int, option: str = "") -> Iterator[None]:
    """Turn an OSError from binding `service` on host:port into PortUnavailable."""
    try:
        yield
    except OSError as exc:
        inner = _os_error_of(exc)
        reason = (_BIND_REASONS.get(inner.errno or 0) or inner.strerror or str(inner)).lower()
        bad_address = inner.errno == errno.EADDRNOTAVAIL or isinstance(inner, socket.gaierror)
        raise PortUnavailable(service, host, port, reason, option,
                              bad_address=bad_address) from None
