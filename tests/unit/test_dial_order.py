"""The dial order (node/reach/dialer.py) with fake transports: LAN address, advertised
public address, the hole-punched path, then the relay; no sockets."""

from __future__ import annotations

from typing import Any

import pytest

import node.reach.dialer as dialer
from node.contact import ContactRecord
from node.errors import PeerUnreachable
from node.identity import Identity
from node.reach.dialer import FailedEndpoints, dial

RELAY = "198.18.0.1:8479"


class FakePipe:
    def __init__(self, label: str) -> None:
        self.label = label
        self.path: str | None = None


class FakeTransport:
    def __init__(self, tried: list[Any], answers: set[tuple[str, int]]) -> None:
        self.tried, self.answers = tried, answers

    async def connect(self, host: str, port: int, *, timeout: float) -> FakePipe:
        self.tried.append((host, port))
        if (host, port) in self.answers:
            return FakePipe(f"{host}:{port}")
        raise PeerUnreachable(f"{host}:{port} does not answer")


def _record(relays: list[str]) -> ContactRecord:
    return ContactRecord.create(Identity.generate("b"), ["198.18.2.2"], {"tcp": 7000}, 1,
                                observed=[("tcp", "198.18.0.12", 7000)], relays=relays)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    w: dict[str, Any] = {"tried": [], "answers": set(), "punched": None}

    async def via_relay(relay: str, peer: object, *, timeout_s: float) -> FakePipe:
        w["tried"].append(f"relay {relay}")
        pipe = FakePipe("relay")
        pipe.path = "relayed"
        return pipe

    monkeypatch.setattr(dialer, "get_transport",
                        lambda name: FakeTransport(w["tried"], w["answers"]))
    monkeypatch.setattr(dialer, "dial_via_relay", via_relay)
    return w


def _punched(w: dict[str, Any]) -> Any:
    async def punched() -> FakePipe | None:
        w["tried"].append("punched")
        return w["punched"]
    return punched


async def test_lan_then_public_then_punched_then_relay(world: dict[str, Any]) -> None:
    pipe = await dial(_record([RELAY]), "tcp", timeout_s=5.0, punched=_punched(world))
    assert world["tried"] == [("198.18.2.2", 7000), ("198.18.0.12", 7000), "punched",
                              f"relay {RELAY}"]
    assert pipe.path == "relayed"  # type: ignore[attr-defined]


async def test_a_punched_path_is_taken_before_the_relay(world: dict[str, Any]) -> None:
    world["punched"] = FakePipe("punched")
    world["punched"].path = "hole-punched"
    pipe = await dial(_record([RELAY]), "tcp", timeout_s=5.0, punched=_punched(world))
    assert pipe is world["punched"]
    assert f"relay {RELAY}" not in world["tried"]


async def test_the_lan_address_wins_when_it_answers(world: dict[str, Any]) -> None:
    world["answers"].add(("198.18.2.2", 7000))
    pipe = await dial(_record([RELAY]), "tcp", timeout_s=5.0, punched=_punched(world))
    assert world["tried"] == [("198.18.2.2", 7000)]
    assert pipe.path == "direct"  # type: ignore[attr-defined]


async def test_endpoints_that_failed_lately_are_skipped_only_with_a_relay_behind(
        world: dict[str, Any]) -> None:
    failed = FailedEndpoints()
    await dial(_record([RELAY]), "tcp", timeout_s=5.0, failed=failed)
    world["tried"].clear()
    await dial(_record([RELAY]), "tcp", timeout_s=5.0, failed=failed)
    assert world["tried"] == [f"relay {RELAY}"]
    # with no relay to fall back on, every endpoint is tried again
    world["tried"].clear()
    with pytest.raises(PeerUnreachable):
        await dial(_record([]), "tcp", timeout_s=5.0, failed=failed)
    assert world["tried"] == [("198.18.2.2", 7000), ("198.18.0.12", 7000)]


async def test_no_punch_step_without_a_relay(world: dict[str, Any]) -> None:
    with pytest.raises(PeerUnreachable):
        await dial(_record([]), "tcp", timeout_s=5.0, punched=_punched(world))
    assert "punched" not in world["tried"]
