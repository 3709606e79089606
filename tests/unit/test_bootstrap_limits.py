"""Unit tests of the bootstrap server's per-address limits (pure, injected clock)."""

from __future__ import annotations

import pytest

from bootstrap.limits import Blocklist, RateLimiter, ServerLimits, source_key


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    rl = RateLimiter(rate_per_s=10.0, burst=5)
    assert [rl.take("a", 100.0) for _ in range(5)] == [0.0] * 5
    retry = rl.take("a", 100.0)
    assert retry == pytest.approx(0.1)  # one token every 0.1 s
    assert rl.refused == 1
    assert rl.take("a", 100.05) > 0  # half a token is not a token
    assert rl.take("a", 100.2) == 0.0
    # another address has its own bucket
    assert rl.take("b", 100.2) == 0.0


def test_bucket_never_holds_more_than_burst() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=3)
    rl.take("a", 0.0)
    taken = sum(rl.take("a", 1_000_000.0) == 0.0 for _ in range(10))
    assert taken == 3


def test_charge_puts_a_big_answer_into_debt() -> None:
    rl = RateLimiter(rate_per_s=10.0, burst=10)
    assert rl.take("a", 0.0) == 0.0
    rl.charge("a", 9, 0.0)  # e.g. a 1,000-row page: 10 pages in all
    assert rl.take("a", 0.0) > 0
    rl.charge("a", 1000, 0.0)  # debt is bounded by one burst
    assert rl.take("a", 2.0) == 0.0  # 20 tokens refilled repay at most a burst of debt


def test_rate_zero_is_unlimited() -> None:
    rl = RateLimiter(rate_per_s=0.0, burst=0)
    assert not rl.enabled
    assert all(rl.take("a", 0.0) == 0.0 for _ in range(10_000))
    assert len(rl) == 0


def test_tracked_sources_are_bounded() -> None:
    rl = RateLimiter(rate_per_s=1.0, burst=1, max_sources=100)
    for i in range(1000):
        rl.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(rl) == 100


def test_source_key_ipv4_ipv6_prefix_and_mapped() -> None:
    assert source_key("127.0.0.2") == "127.0.0.2"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key(None) == ""


@pytest.mark.parametrize("field,value", [
    ("register_rate_per_s", -1.0), ("list_rate_per_s", float("inf")),
    ("register_burst", -1), ("legacy_ids_per_source", -5),
    ("header_timeout_s", 0.0), ("body_timeout_s", float("nan")),
    ("block_after_refusals", -1), ("block_s", 0.0),
])
def test_limits_refuse_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ServerLimits(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("nodes", [50, 100])
def test_default_limits_never_refuse_a_testnet_on_one_address(nodes: int) -> None:
    """The daemon's bootstrap loop (node/discovery/bootstrap.py) with testnet_lib's
    register_interval_s=3, every node on 127.0.0.1, all started at once: 10 virtual
    minutes without a single refusal, with room for twice the ~50 nodes a testnet runs."""
    import random

    from node.discovery.bootstrap import PEER_POLL_S

    register_interval_s = 3.0
    lim = ServerLimits()
    reg = RateLimiter(lim.register_rate_per_s, lim.register_burst)
    lst = RateLimiter(lim.list_rate_per_s, lim.list_burst)
    rng = random.Random(1)
    # (next request time, node, registered_at)
    nodes_state = [(rng.uniform(0, 0.5), i, -1e9) for i in range(nodes)]
    refused = 0
    while nodes_state:
        nodes_state.sort()
        now, i, registered_at = nodes_state.pop(0)
        if now > 600:
            continue
        if now - registered_at >= register_interval_s:
            refused += reg.take("127.0.0.1", now) > 0
            registered_at = now
        else:
            refused += lst.take("127.0.0.1", now) > 0
        delay = min(PEER_POLL_S, register_interval_s) * rng.uniform(0.9, 1.1)
        nodes_state.append((now + delay, i, registered_at))
    assert refused == 0


def test_node_bootstrap_flag_defaults_match_server_limits() -> None:
    import typer.main

    from node.cli import app

    group = typer.main.get_command(app)
    cmd = group.commands["bootstrap"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in cmd.params}
    lim = ServerLimits()
    assert defaults["register_rate"] == lim.register_rate_per_s
    assert defaults["register_burst"] == lim.register_burst
    assert defaults["list_rate"] == lim.list_rate_per_s
    assert defaults["list_burst"] == lim.list_burst
    assert defaults["legacy_per_ip"] == lim.legacy_ids_per_source
    assert defaults["header_timeout"] == lim.header_timeout_s
    assert defaults["body_timeout"] == lim.body_timeout_s
    assert defaults["turns_per_ip"] == lim.concurrent_per_source
    assert defaults["pace_per_ip"] == lim.pace_per_s
    assert defaults["block_after"] == lim.block_after_refusals
    assert defaults["block_for"] == lim.block_s


def test_node_bootstrap_passes_turns_per_ip_to_the_server(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from typer.testing import CliRunner

    import bootstrap.server
    import node.cli
    from node.cli import app

    seen: list[ServerLimits] = []
    monkeypatch.setattr(bootstrap.server, "run", lambda **kw: seen.append(kw["limits"]))
    monkeypatch.setattr(node.cli, "_setup_logging", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["bootstrap", "--port", "0", "--turns-per-ip", "5"])
    assert result.exit_code == 0, result.output
    assert seen[0].concurrent_per_source == 5
    result = CliRunner().invoke(app, ["bootstrap", "--turns-per-ip", "-1"])
    assert result.exit_code == 2 and "option --turns-per-ip must be >= 0" in result.output
    result = CliRunner().invoke(app, ["bootstrap", "--block-after", "9", "--block-for", "3"])
    assert result.exit_code == 0, result.output
    assert (seen[-1].block_after_refusals, seen[-1].block_s) == (9, 3.0)
    result = CliRunner().invoke(app, ["bootstrap", "--pace-per-ip", "0"])
    assert result.exit_code == 0 and seen[-1].pace_per_s == 0.0
    result = CliRunner().invoke(app, ["bootstrap", "--pace-per-ip", "-3"])
    assert result.exit_code == 2 and "option --pace-per-ip must be a number" in result.output
    result = CliRunner().invoke(app, ["bootstrap", "--block-for", "0"])
    assert result.exit_code == 2 and "option --block-for must be a positive" in result.output


def test_a_connection_is_admitted_only_while_it_could_be_served() -> None:
    from bootstrap.limits import ADMIT_MIN_CONNECTIONS, admit_connection

    assert not admit_connection(0.9, 0)  # every bucket empty: each request would be a 429
    # no more open connections than tokens left, but always a few
    assert admit_connection(1.0, ADMIT_MIN_CONNECTIONS - 1)
    assert not admit_connection(1.0, ADMIT_MIN_CONNECTIONS)
    assert admit_connection(10.5, 9) and not admit_connection(10.5, 10)
    assert admit_connection(500.0, 100)  # an honest source: its buckets are near full


def test_tokens_peeks_without_spending() -> None:
    rl = RateLimiter(1.0, 3)
    assert rl.tokens("a", 0.0) == 3.0  # a source not seen yet has a full bucket
    rl.take("a", 0.0)
    assert rl.tokens("a", 0.0) == 2.0 and rl.tokens("a", 0.0) == 2.0
    assert rl.tokens("a", 0.5) == 2.5
    assert RateLimiter(0.0, 3).tokens("a", 0.0) == float("inf")  # off: unlimited


def test_a_source_refused_often_enough_within_the_window_is_blocked_until_it_ends() -> None:
    bl = Blocklist(3, window_s=1.0, block_s=10.0)
    assert not bl.refused("a", 0.0) and not bl.refused("a", 0.5)
    assert bl.refused("a", 0.9)  # the third within 1 s
    assert bl.blocked() == ["a"] and bl.next_expiry() == 10.9
    assert not bl.refused("a", 1.0)  # already blocked: nothing new to install
    assert not bl.expire(10.0) and bl.blocked() == ["a"]
    assert bl.expire(10.9) and bl.blocked() == [] and bl.next_expiry() is None
    # after the block it starts counting again from nothing
    assert not bl.refused("a", 11.0) and not bl.refused("a", 11.1)


def test_refusals_spread_wider_than_the_window_never_block() -> None:
    bl = Blocklist(3, window_s=1.0)
    assert not any(bl.refused("a", t * 0.6) for t in range(100))
    assert bl.blocked() == []


def test_blocks_and_refusal_windows_are_bounded() -> None:
    bl = Blocklist(1, block_s=10.0, max_blocked=4, max_sources=8)
    for i in range(6):
        assert bl.refused(f"s{i}", float(i))
    # the blocks that would end soonest made room for the newest
    assert bl.blocked() == ["s2", "s3", "s4", "s5"]
    bl = Blocklist(2, max_sources=8)
    for i in range(100):
        bl.refused(f"s{i}", 0.0)
    assert len(bl._windows) == 8  # least recently refused forgotten first
    assert bl.refused("s99", 0.1)  # ... and the recent ones still count


def test_a_blocklist_with_no_threshold_blocks_nothing() -> None:
    bl = Blocklist(0)
    assert not bl.enabled
    assert not any(bl.refused("a", 0.0) for _ in range(1000))
    assert bl.blocked() == []
    assert not Blocklist(ServerLimits.unlimited().block_after_refusals).enabled


@pytest.mark.parametrize("rate,burst,block_s", [(50.0, 500, 10.0), (50.0, 500, 20.0),
                                                (50.0, 100, 10.0)])
def test_a_suspended_bucket_earns_nothing_until_the_suspension_ends(
        rate: float, burst: int, block_s: float) -> None:
    rl = RateLimiter(rate, burst)
    rl.suspend("a", block_s)  # at t = 0, until block_s
    for t in (0.0, block_s / 2, block_s - 0.01):
        assert rl.take("a", t) > 0  # refused, and the refusal does not end the suspension
    assert rl.tokens("a", block_s) == 0.0
    rl.charge("a", 0.5, block_s / 2)  # nor does a charge: only a debt is added
    assert rl.tokens("a", block_s) == -0.5
    assert rl.tokens("a", block_s + 1.5) == pytest.approx(min(burst, rate * 1.5 - 0.5))
    # a retry-after for a suspended source counts the suspension
    rl.suspend("b", 5.0)
    assert rl.take("b", 1.0) == pytest.approx(4.0 + 1.0 / rate)


def test_blocklist_shrinks_to_the_blocks_that_end_last_and_can_be_disabled() -> None:
    bl = Blocklist(1, block_s=10.0)
    for i in range(5):
        bl.refused(f"s{i}", float(i))
    bl.shrink(2)
    assert bl.blocked() == ["s3", "s4"] and "s4" in bl and "s0" not in bl
    bl.disable()
    assert not bl.enabled and bl.blocked() == [] and not bl.refused("s9", 20.0)
