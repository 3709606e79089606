"""bootstrap.sockfilter on real listening sockets: a blocked source's SYNs never arrive."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from bootstrap import sockfilter

pytestmark = pytest.mark.skipif(not sockfilter.supported(),
                                reason="socket filters (SO_ATTACH_FILTER) are Linux only")

# a dropped SYN is retried after 1 s: a connect that has not completed by then never
# reached the listener
DROPPED_WITHIN_S = 0.4


def _connects(family: int, src: str, dst: tuple[str, int]) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.bind((src, 0))
        conn.settimeout(DROPPED_WITHIN_S)
        try:
            conn.connect(dst)
        except TimeoutError:
            return False
        return True


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock


def test_a_blocked_ipv4_address_cannot_connect_and_the_others_can(
        listener: socket.socket) -> None:
    dst = listener.getsockname()
    sockfilter.block(listener, ["127.0.0.2", "127.0.0.9", "2001:db8::/64"])
    assert not _connects(socket.AF_INET, "127.0.0.2", dst)
    assert _connects(socket.AF_INET, "127.0.0.3", dst)
    assert _connects(socket.AF_INET, "127.0.0.1", dst)
    # replaced: now 127.0.0.3 is the one dropped
    sockfilter.block(listener, ["127.0.0.3"])
    assert _connects(socket.AF_INET, "127.0.0.2", dst)
    assert not _connects(socket.AF_INET, "127.0.0.3", dst)
    # nothing blocked: the filter is gone (and removing none is fine too)
    sockfilter.block(listener, [])
    sockfilter.block(listener, [])
    assert _connects(socket.AF_INET, "127.0.0.3", dst)


def test_the_longest_list_the_server_keeps_still_filters(listener: socket.socket) -> None:
    from bootstrap.limits import BLOCKED_MAX

    dst = listener.getsockname()
    sources = [f"10.{i // 250}.{i % 250}.1" for i in range(BLOCKED_MAX - 1)] + ["127.0.0.2"]
    sockfilter.block(listener, sources)
    assert not _connects(socket.AF_INET, "127.0.0.2", dst)
    assert _connects(socket.AF_INET, "127.0.0.3", dst)
    v6 = [f"2001:db8:{i:x}::/64" for i in range(BLOCKED_MAX)]
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock6:
        sockfilter.block(sock6, v6)
        sockfilter.block(sock6, v6[1:] + ["2001:db8:ffff::/64"])  # replaced whole


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_a_blocked_ipv6_prefix_cannot_connect() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::1", 0))
        sock.listen(8)
        dst = sock.getsockname()[:2]
        sockfilter.block(sock, ["2001:db8::/64", "127.0.0.1"])  # neither is ::1's
        assert _connects(socket.AF_INET6, "::1", dst)
        sockfilter.block(sock, ["::/64"])  # ::1's /64
        assert not _connects(socket.AF_INET6, "::1", dst)


def test_programs_refuse_what_is_not_a_source_of_the_family() -> None:
    with pytest.raises(ValueError, match="/64"):
        sockfilter.drop_program(socket.AF_INET6, ["2001:db8::/48"])
    with pytest.raises(ValueError):
        sockfilter.drop_program(socket.AF_INET, ["not-an-address"])
    with pytest.raises(ValueError, match="family"):
        sockfilter.drop_program(socket.AF_UNIX, ["127.0.0.2"])
    with pytest.raises(ValueError, match="kernel takes"):
        sockfilter.drop_program(socket.AF_INET, [f"10.0.{i // 250}.{i % 250}"
                                                 for i in range(3000)])
    # no sources: a program that accepts everything
    assert sockfilter.drop_program(socket.AF_INET, ["2001:db8::/64"]) == \
        sockfilter.drop_program(socket.AF_INET, [])
    assert len(sockfilter.drop_program(socket.AF_INET, [])) == 8  # one instruction
