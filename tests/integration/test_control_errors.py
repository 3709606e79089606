"""Errors cross the control socket as the class the daemon raised, with its exit code."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from bootstrap.store import RegistryFull
from node.control import ControlClient, ControlServer, Emit, socket_path_for
from node.errors import LocalIOError, P2PError, PortUnavailable
from node.transfer.paths import PathBlocked


@pytest.mark.parametrize("raised", [
    PathBlocked("/x/y is in the way: it is not a folder"),
    RegistryFull("the registry is full (3 registrations)"),
    PortUnavailable("dht", "127.0.0.1", 8468, "the port is already in use", "--dht-port"),
])
async def test_subclass_reaches_the_client_as_itself(tmp_path: Path, raised: P2PError) -> None:
    server = ControlServer(socket_path_for(tmp_path))

    async def fail(args: dict[str, Any], emit: Emit) -> None:
        raise raised

    server.register("fail", fail)
    await server.start()
    try:
        with pytest.raises(P2PError) as info:
            await ControlClient(tmp_path).call("fail")
    finally:
        await server.close()
    assert type(info.value) is type(raised)
    assert info.value.exit_code == raised.exit_code
    assert str(info.value) == str(raised)


async def test_os_error_in_a_handler_is_a_local_io_error(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    server = ControlServer(socket_path_for(tmp_path))

    async def fail(args: dict[str, Any], emit: Emit) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/locked")

    server.register("fail", fail)
    await server.start()
    try:
        with pytest.raises(LocalIOError, match="Permission denied: /srv/locked"):
            await ControlClient(tmp_path).call("fail")
    finally:
        await server.close()
    assert "Traceback" not in caplog.text
