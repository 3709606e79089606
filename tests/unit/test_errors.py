"""The error tree: lookup by name walks the lineage, bind failures map to one class."""

from __future__ import annotations

import errno
import socket

import pytest

from bootstrap.store import RegistryFull
from node.errors import (
    ERROR_CLASSES,
    LocalIOError,
    P2PError,
    PortUnavailable,
    ProtocolError,
    bind_errors,
    describe_os_error,
    error_class,
    error_lineage,
)
from node.transfer.paths import PathBlocked


@pytest.mark.parametrize("cls", [PathBlocked, RegistryFull, PortUnavailable, ProtocolError])
def test_subclasses_keep_their_own_class_and_exit_code(cls: type[P2PError]) -> None:
    exc = cls.from_message("boom")
    assert ERROR_CLASSES[cls.__name__] is cls
    found = error_class(error_lineage(exc))
    assert found is cls and found.exit_code == cls.exit_code
    assert str(found.from_message("boom")) == "boom"


def test_lineage_walks_to_the_nearest_known_ancestor() -> None:
    # a subclass from a module this process never imported: its parent's exit code
    lineage = ["FolderVanished", "LocalIOError", "P2PError"]
    assert error_class(lineage) is LocalIOError
    assert error_class(lineage).exit_code == 4
    assert error_lineage(PathBlocked("x")) == ["PathBlocked", "LocalIOError", "P2PError"]
    assert error_class(["NoSuchError", 7]) is P2PError  # type: ignore[list-item]
    assert error_class([]) is P2PError


@pytest.mark.parametrize("error, reason, bad_address", [
    (OSError(errno.EADDRINUSE, "whatever the OS says"), "already in use", False),
    (PermissionError(errno.EACCES, "whatever the OS says"), "permission denied", False),
    (OSError(errno.EADDRNOTAVAIL, "whatever the OS says"), "not one of this machine's", True),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "name or service", True),
])
def test_bind_errors_names_service_port_and_option(error: OSError, reason: str,
                                                   bad_address: bool) -> None:
    with pytest.raises(PortUnavailable) as info, bind_errors("dht", "127.0.0.1", 8468):
        raise error
    exc = info.value
    assert (exc.service, exc.port, exc.exit_code) == ("dht", 8468, LocalIOError.exit_code)
    assert exc.bad_address is bad_address
    assert reason in str(exc) and "8468" in str(exc)
    named = exc.naming("--dht-port")
    assert str(named).endswith("use another with --dht-port") and reason in str(named)
    assert named.bad_address is bad_address
    assert "\n" not in str(named)


def test_bind_errors_reads_the_errno_uvloop_hides_in_the_context() -> None:
    # uvloop's create_datagram_endpoint raises a bare OSError; the real one is its context
    with pytest.raises(PortUnavailable, match="already in use"), \
            bind_errors("udp", "127.0.0.1", 9):
        try:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        except OSError:
            raise OSError("could not bind to local_addr ('127.0.0.1', 9)") from None


def test_bind_errors_on_a_real_busy_port() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(PortUnavailable, match=f"udp port {port} .*already in use"), \
                bind_errors("udp", "127.0.0.1", port):
            try:
                sock.bind(("127.0.0.1", port))
            finally:
                sock.close()
    finally:
        holder.close()


def test_describe_os_error_is_one_line_with_the_file() -> None:
    exc = PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert describe_os_error(exc) == "Permission denied: /root/x"
    assert describe_os_error(OSError("odd")) == "odd"
