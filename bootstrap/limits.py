"""Per-client limits of the bootstrap server: token buckets per source address, and the knobs.

Pure: no sockets, no clock inside (``now`` comes from the caller, monotonic
seconds), no aiohttp. Imported by the server and by ``python -m bootstrap``;
imports nothing of the project.

A *source* is the key a limit is counted under: the full address for IPv4,
the /64 prefix for IPv6 (one host usually owns a whole /64, so per-address
counting would be no limit at all there).

Defaults are sized so that ~50 nodes behind one address (a testnet on
127.0.0.1, a household or office behind one NAT) never meet a limit: such a
node registers at most every few seconds and lists peers every 5 s, so 50 of
them send under 20 requests/s; the buckets allow 50/s sustained and 500 at
once. Loopback is deliberately NOT exempt: the floods in
``scripts/attacks/bootstrap.py`` come from 127.0.0.2+ and must be limited.
Every rate or cap set to 0 turns that limit off (benchmarks of raw capacity
do that explicitly).
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

# POST /register and DELETE /register/<id> per source: sustained rate and burst
REGISTER_RATE_PER_S = 50.0
REGISTER_BURST = 500
# GET /peers per source, in pages of LIST_PAGE_ROWS rows (a page of 1,000 rows costs 10)
LIST_RATE_PER_S = 50.0
LIST_BURST = 500
LIST_PAGE_ROWS = 100
# a refused request is answered (429) after this delay, so a client that ignores
# Retry-After and asks again at once (a closed-loop flood) sends at most one request a
# second per connection instead of thousands; at most TARPIT_MAX_WAITING wait at once,
# beyond that the 429 goes out immediately
TARPIT_DELAY_S = 1.0
TARPIT_MAX_WAITING = 1024
# legacy (unsigned, made-up) device ids one source may hold at once; expired ones
# count until the next purge (at most 60 s later)
LEGACY_IDS_PER_SOURCE = 64
# a connection must deliver a request's headers this long after it opened (or after the
# previous answer, when kept alive), else it is closed: the slowloris defence. Also the
# idle keep-alive timeout: a bootstrap client polls every few seconds or reconnects.
HEADER_TIMEOUT_S = 10.0
# a request body (at most MAX_BODY_BYTES) must arrive this long after its headers
BODY_TIMEOUT_S = 10.0
# requests of one source handled at once; more wait their turn (FIFO per source), so a
# source with many connections gets no larger share of the event loop than one with a
# few: the server's turns go round the sources, not round the connections. A request takes
# well under a millisecond, so ~50 nodes behind one address rarely have more than one
# in flight; WAITING_PER_SOURCE more may queue, beyond that the answer is an immediate 429
CONCURRENT_PER_SOURCE = 2
WAITING_PER_SOURCE = 256
# and a source's turns start at most PACE_PER_S a second, after PACE_BURST at once: the
# buckets above let a source spend 500 tokens at once, and spent as fast as the loop
# turns, a burst of registrations (a signature check each) and 1,000-row listings keeps
# the loop busy for most of a second, so every honest answer in that second waits behind
# flood handlers. Paced, the same burst is served over ~2 s, a handler every 4 ms, and an
# honest request meets at most one of them. Above the buckets' sustained 50 + 50/s, so
# it never limits the sustained rate they allow, only how fast a burst is spent; ~50
# nodes behind one address send under 20 requests/s, and starting together wait at most
# ~0.4 s for their first answers. Turns off with the turns (CONCURRENT_PER_SOURCE 0).
# The bursts here and in SETUP_BURST are what a flood's first moment gets at once:
# 8 and 4 against 16 and 8, interleaved 5,000-id floods (12 runs each), took the honest
# p99's flood / quiet median from 1.56x to 1.10x
PACE_PER_S = 250.0
PACE_BURST = 8
# at accept time a source may hold at most as many open connections as it has tokens
# left (in its fullest bucket), and at least ADMIT_MIN_CONNECTIONS: a connection beyond that
# would only carry a request answered 429 (parsed, tarpitted, dropped when the flooder
# hangs up), so it is reset before any HTTP parsing. A source with its buckets near full
# (every honest one: ~50 nodes spend under 20 of 50 tokens/s) never meets this
ADMIT_MIN_CONNECTIONS = 2
# a source's new connections are not set up (see SETUP_PER_S) while this many of its
# requests already wait for their turns (SourceTurns): each would only add one more request
# to the line, parsed and waiting, which a flooder drops when it tires of waiting (the
# server has parsed it, built its request and task, and cancels it: the bulk of what a
# closed-loop flood over 64 connections costs). An honest source's requests rarely wait
ADMIT_MAX_QUEUED = 4
# an admitted connection gets its transport (and with it the parsing of its request and
# the request's task, ~0.2 ms of the loop even while the request then waits for its turn)
# at most SETUP_BURST at once and SETUP_PER_S a second per source, and not while
# ADMIT_MAX_QUEUED of its requests wait for their turns; the others wait, accepted and
# unread, in order, at most HEADER_TIMEOUT_S each (then reset), no more of them than the
# source may hold open (above). 64 connections a flooder opens at once otherwise cost one
# loop turn ~13 ms, which every honest answer due in it waits for. p2pfs nodes open a
# connection per request, so 100 nodes behind one address starting together have their
# first requests read over ~0.2 s, and served over ~0.4 s (PACE_PER_S)
SETUP_PER_S = 500.0
SETUP_BURST = 4


# an address refused at accept BLOCK_AFTER_REFUSALS times within BLOCK_WINDOW_S has been
# answered 429 with Retry-After and refused at accept since, and keeps opening connections
# anyway (a closed-loop flood: thousands a second from one address): it is then dropped by
# the kernel, in the listening socket's filter, for BLOCK_S (bootstrap/sockfilter.py). Its
# connection attempts then cost the server process nothing at all: no accept, no close,
# no loop turn, where each refused accept still cost it ~80 us of its one core. A waiting
# connection (SETUP_PER_S) its client hung up on counts as a refusal too: a flood's
# patience is short. A source within its limits is never refused at accept, and an honest
# client waits for its answer, so it is never blocked; ~50 nodes behind one address (the
# defaults' sizing) do not come near, nor do 300 starting together
BLOCK_AFTER_REFUSALS = 64
BLOCK_WINDOW_S = 1.0
BLOCK_S = 10.0
# sources blocked at once (a socket filter is a short list the kernel walks for each
# connection attempt: 2 instructions per IPv4 address, 5 per IPv6 /64). Beyond it the
# block that ends soonest is dropped early: a flood from this many addresses at once is
# a distributed one, which the per-address buckets (and the network) have to carry
BLOCKED_MAX = 256


def admit_connection(tokens_left: float, open_connections: int) -> bool:
    """Whether a new connection of a source is accepted (see ADMIT_MIN_CONNECTIONS):
    ``tokens_left`` in the source's fullest bucket, ``open_connections`` it holds now."""
    if tokens_left < 1.0:
        return False  # each of its requests would be a 429
    return open_connections < max(ADMIT_MIN_CONNECTIONS, math.floor(tokens_left))


# how many sources the limiter remembers; beyond it, the least recently seen is forgotten
# (a forgotten source starts again with a full bucket: only a flood from this many
# addresses at once could use that, and one IP is what the limits are for)
MAX_TRACKED_SOURCES = 65536
IPV6_PREFIX_BITS = 64


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client may cost the server; 0 for a rate or a cap means unlimited."""

    register_rate_per_s: float = REGISTER_RATE_PER_S
    register_burst: int = REGISTER_BURST
    list_rate_per_s: float = LIST_RATE_PER_S
    list_burst: int = LIST_BURST
    legacy_ids_per_source: int = LEGACY_IDS_PER_SOURCE
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    concurrent_per_source: int = CONCURRENT_PER_SOURCE
    waiting_per_source: int = WAITING_PER_SOURCE
    pace_per_s: float = PACE_PER_S
    block_after_refusals: int = BLOCK_AFTER_REFUSALS
    block_s: float = BLOCK_S

    def __post_init__(self) -> None:
        for name in ("register_rate_per_s", "list_rate_per_s", "pace_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0 (0 = unlimited)")
        for name in ("register_burst", "list_burst", "legacy_ids_per_source",
                     "concurrent_per_source", "waiting_per_source", "block_after_refusals"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("header_timeout_s", "body_timeout_s", "block_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds")

    @classmethod
    def unlimited(cls) -> ServerLimits:
        """No rate limits, no legacy cap, no per-source turns or pacing, no kernel blocks
        (timeouts stay): for capacity benchmarks."""
        return cls(register_rate_per_s=0.0, list_rate_per_s=0.0, legacy_ids_per_source=0,
                   concurrent_per_source=0, pace_per_s=0.0, block_after_refusals=0)


@functools.lru_cache(maxsize=4096)  # parsed twice per request; the steady state repeats
def source_key(remote: str | None) -> str:
    """The key a client's requests count under: its IPv4 address or its IPv6 /64."""
    if not remote:
        return ""
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        net = ipaddress.IPv6Network((addr, IPV6_PREFIX_BITS), strict=False)
        return str(net)
    return str(addr)


class RateLimiter:
    """Token buckets keyed by source: ``rate_per_s`` tokens a second, at most ``burst``.

    ``take(source, now)`` spends one token and returns 0.0, or returns how many
    seconds until a token is back (the request is refused). ``rate_per_s == 0``
    never refuses. Memory is bounded by ``max_sources`` buckets.
    """

    def __init__(self, rate_per_s: float, burst: int, *,
                 max_sources: int = MAX_TRACKED_SOURCES) -> None:
        self.rate_per_s = float(rate_per_s)
        self.burst = float(max(1, burst))
        self.max_sources = max_sources
        # source -> (tokens, at): tokens the bucket held at monotonic time `at`
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.refused = 0

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, source: str, now: float) -> float:
        if not self.enabled:
            return 0.0
        state = self._buckets.pop(source, None)
        if state is None:
            tokens, at = self.burst, now
        else:
            held, at = state
            tokens = min(self.burst, held + max(0.0, now - at) * self.rate_per_s)
            at = max(at, now)  # a suspended bucket (at in the future) earns nothing before
        if tokens >= 1.0:
            self._buckets[source] = (tokens - 1.0, at)
            retry_s = 0.0
        else:
            self._buckets[source] = (tokens, at)
            retry_s = (1.0 - tokens) / self.rate_per_s + (at - now)
            self.refused += 1
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return retry_s

    def tokens(self, source: str, now: float) -> float:
        """The tokens ``source`` holds now (a peek: spends nothing; ``burst`` for a source
        not seen yet, ``inf`` when the limiter is off)."""
        if not self.enabled:
            return math.inf
        state = self._buckets.get(source)
        if state is None:
            return self.burst
        held, at = state
        return min(self.burst, held + max(0.0, now - at) * self.rate_per_s)

    def charge(self, source: str, tokens: float, now: float) -> None:
        """Spend ``tokens`` more after the fact (a large answer): the bucket may go into debt
        (down to -burst), and the source waits until it is repaid."""
        if not self.enabled or tokens <= 0:
            return
        held, at = self._buckets.pop(source, (self.burst, now))
        held = min(self.burst, held + max(0.0, now - at) * self.rate_per_s)
        self._buckets[source] = (max(-self.burst, held - tokens), max(at, now))

    def suspend(self, source: str, until: float) -> None:
        """``source`` holds no token now and earns none before ``until`` (monotonic s):
        its bucket starts filling from empty then (a debt it had stays)."""
        if not self.enabled:
            return
        held, _ = self._buckets.pop(source, (0.0, until))
        self._buckets[source] = (min(0.0, held), until)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class Blocklist:
    """Which sources are blocked in the kernel and until when (see BLOCK_AFTER_REFUSALS).

    ``refused(source, now)`` counts one refusal at accept and returns True when that
    blocks ``source`` (the caller then installs ``blocked()``); ``expire(now)`` ends the
    blocks due and returns True if any ended. Pure, bounded: at most BLOCKED_MAX blocks
    and MAX_TRACKED_SOURCES refusal windows (least recently refused forgotten first).
    ``after_refusals == 0`` blocks nothing.
    """

    def __init__(self, after_refusals: int = BLOCK_AFTER_REFUSALS, *,
                 window_s: float = BLOCK_WINDOW_S, block_s: float = BLOCK_S,
                 max_blocked: int = BLOCKED_MAX,
                 max_sources: int = MAX_TRACKED_SOURCES) -> None:
        self.after_refusals = after_refusals
        self.window_s = window_s
        self.block_s = block_s
        self.max_blocked = max_blocked
        self._max_sources = max_sources
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._until: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.after_refusals > 0

    def refused(self, source: str, now: float) -> bool:
        if not self.enabled or source in self._until:
            return False
        start, count = self._windows.pop(source, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
        count += 1
        if count < self.after_refusals:
            self._windows[source] = (start, count)
            if len(self._windows) > self._max_sources:
                self._windows.popitem(last=False)
            return False
        if len(self._until) >= self.max_blocked:
            del self._until[min(self._until, key=self._until.__getitem__)]
        self._until[source] = now + self.block_s
        return True

    def expire(self, now: float) -> bool:
        due = [source for source, until in self._until.items() if until <= now]
        for source in due:
            del self._until[source]
        return bool(due)

    def blocked(self) -> list[str]:
        return sorted(self._until)

    def __contains__(self, source: object) -> bool:
        return source in self._until

    def shrink(self, keep: int) -> None:
        """Keep only the ``keep`` blocks that end last (when the kernel cannot hold more)."""
        soonest = sorted(self._until, key=self._until.__getitem__)
        for source in soonest[:max(0, len(soonest) - keep)]:
            del self._until[source]

    def disable(self) -> None:
        """Block nothing from now on (the kernel refused the filter)."""
        self.after_refusals = 0
        self._until.clear()
        self._windows.clear()

    def next_expiry(self) -> float | None:
        return min(self._until.values(), default=None)
