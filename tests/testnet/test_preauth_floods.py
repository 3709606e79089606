"""Floods before authentication against real node processes (scripts/attacks/tcp.py and
udp.py in their quick size): the node's RSS stays bounded and a trusted `node ping`
succeeds during each flood. Only a real process shows both: RSS is per process, and the
ping goes through the CLI, the daemon and its listeners."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from attacks import Row, tcp, udp  # noqa: E402
from testnet_lib import Testnet  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def net() -> Iterator[Testnet]:
    with tcp.victim_and_friend() as net:
        yield net


def _failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.ok is False]


def _value(rows: list[Row], attack_prefix: str, metric: str) -> float:
    return next(r.value for r in rows if r.attack.startswith(attack_prefix) and r.metric == metric)


def test_tcp_floods_cost_little_memory_and_trusted_ping_is_served(net: Testnet) -> None:
    # before: 100 connections announcing 8 MiB frames took the node from 130 to 905 MiB
    rows = tcp.measure(net, quick=True)
    assert not _failed(rows), _failed(rows)
    assert _value(rows, "tcp announce", "victim RSS increase (peak)") < tcp.RSS_TARGET_MB
    assert _value(rows, "tcp slowloris", "trusted ping during flood") == 1.0


def test_udp_spoofed_init_flood_does_not_stop_trusted_ping(net: Testnet) -> None:
    # before: 300 spoofed INITs made every new udp channel fail for ~10 s
    rows = udp.measure(net, quick=True)
    assert not _failed(rows), _failed(rows)
    assert _value(rows, "udp spoofed", "trusted ping during flood") == 1.0
    assert _value(rows, "udp spoofed", "INITs sent") >= udp.QUICK_INITS * 0.9


def test_udp_floods_past_the_cookie_cost_little_memory(net: Testnet) -> None:
    # attackers that own their addresses: 8 MiB messages before authenticating, and
    # silent connections holding pre-auth slots from 200 addresses
    rows = udp.measure_cookie_floods(net, quick=True)
    assert not _failed(rows), _failed(rows)
    assert _value(rows, "udp announce", "of those closed by the victim") == \
        _value(rows, "udp announce", "flood connections opened")
