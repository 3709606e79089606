"""The hole-punch coordination machines (node/reach/punch.py), paired in memory:
no sockets, no sleeping; time is passed in."""

from __future__ import annotations

import pytest

from node.contact import ContactRecord
from node.discovery.addresses import ANY_V4
from node.errors import ProtocolError
from node.identity import Identity
from node.reach.punch import (
    MAX_ATTEMPTS,
    MAX_ENDPOINTS,
    MAX_PUNCH_MESSAGE_BYTES,
    PUNCH_DATAGRAM,
    REPLY_TIMEOUT_S,
    Action,
    Dial,
    Finished,
    InitiatorState,
    PunchConnect,
    PunchDone,
    PunchedPaths,
    PunchInitiator,
    PunchResponder,
    PunchSync,
    ResponderState,
    Send,
    StartPunching,
    StopPunching,
    udp_candidates,
)
from node.transports.udp_machine import MAGIC
from node.wire import decode_message, packb

A_EPS = [("198.18.1.2", 4000), ("198.18.0.11", 4000)]
B_EPS = [("198.18.2.2", 5000), ("198.18.0.12", 5000)]
RELAY_ONE_WAY_S = 0.02


class Pair:
    """Both machines and a relayed link with a fixed one-way delay, run by hand."""

    def __init__(self) -> None:
        self.ini = PunchInitiator(A_EPS)
        self.res = PunchResponder(B_EPS)
        self.now = 100.0
        self.dials: list[Dial] = []
        self.punches: list[StartPunching] = []
        self.stops = 0
        self.finished: dict[str, Finished] = {}

    def _run(self, side: str, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                # the wire codec sits in the middle, as in the driver
                msg = decode_message(a.message.encode(), max_bytes=MAX_PUNCH_MESSAGE_BYTES)
                self.now += RELAY_ONE_WAY_S
                other = "res" if side == "ini" else "ini"
                target = self.res if other == "res" else self.ini
                self._run(other, target.on_message(msg, self.now))
            elif isinstance(a, Dial):
                self.dials.append(a)
            elif isinstance(a, StartPunching):
                self.punches.append(a)
            elif isinstance(a, StopPunching):
                self.stops += 1
            elif isinstance(a, Finished):
                self.finished[side] = a

    def start(self) -> None:
        self._run("ini", self.ini.start(self.now))

    def fire_timer(self) -> None:
        when = self.ini.timer()
        assert when is not None
        self.now = when
        self._run("ini", self.ini.on_timer(self.now))

    def dial_result(self, ok: bool) -> None:
        self.now += 0.3
        self._run("ini", self.ini.on_dial_result(ok, self.now))


def test_a_punch_that_works_first_time() -> None:
    p = Pair()
    p.start()
    # connect and the answer went round: rtt measured, sync sent, responder punching
    assert p.ini.rtt_s == pytest.approx(2 * RELAY_ONE_WAY_S)
    assert p.ini.state is InitiatorState.WAITING_HALF_RTT
    assert p.res.state is ResponderState.PUNCHING
    assert p.punches == [StartPunching(tuple(A_EPS), 1)]
    # the initiator dials rtt/2 after its sync left: when the sync reaches the responder
    sync_sent = p.now - RELAY_ONE_WAY_S
    assert p.ini.timer() == pytest.approx(sync_sent + RELAY_ONE_WAY_S)
    assert not p.dials
    p.fire_timer()
    assert p.dials == [Dial(tuple(B_EPS), 1)]
    p.dial_result(True)
    assert p.finished["ini"] == Finished(True, 1, pytest.approx(2 * RELAY_ONE_WAY_S))
    assert p.finished["res"].ok and p.res.state is ResponderState.SUCCEEDED
    assert p.stops == 1  # the responder stopped opening its NAT


def test_two_failed_attempts_then_success() -> None:
    p = Pair()
    p.start()
    for attempt in (1, 2):
        p.fire_timer()
        assert p.dials[-1].attempt == attempt
        p.dial_result(False)
        assert "ini" not in p.finished
    assert p.ini.attempt == 3 and p.res.state is ResponderState.PUNCHING
    p.fire_timer()
    p.dial_result(True)
    assert p.finished["ini"].ok and p.finished["ini"].attempts == 3
    assert p.finished["res"].ok


def test_gives_up_after_max_attempts() -> None:
    p = Pair()
    p.start()
    for _ in range(MAX_ATTEMPTS):
        p.fire_timer()
        p.dial_result(False)
    ini = p.finished["ini"]
    assert (ini.ok, ini.attempts) == (False, MAX_ATTEMPTS) and ini.rtt_s is not None
    assert p.finished["res"] == Finished(False, MAX_ATTEMPTS, None)
    assert p.ini.state is InitiatorState.FAILED and p.res.state is ResponderState.FAILED
    assert len(p.dials) == len(p.punches) == MAX_ATTEMPTS


def test_sync_delay_is_capped_for_a_slow_relay() -> None:
    ini = PunchInitiator(A_EPS)
    ini.start(0.0)
    ini.on_message(PunchConnect(1, tuple(B_EPS)), 30.0)  # a 30 s relayed round trip
    when = ini.timer()
    assert when is not None and when - 30.0 <= 1.0


def test_no_answer_ends_the_punch() -> None:
    ini = PunchInitiator(A_EPS)
    ini.start(0.0)
    assert ini.on_timer(REPLY_TIMEOUT_S - 0.1) == []
    assert ini.on_timer(REPLY_TIMEOUT_S) == [Finished(False, 1, None)]
    assert ini.state is InitiatorState.FAILED


def test_peer_without_endpoints_costs_an_attempt_not_a_dial() -> None:
    ini = PunchInitiator(A_EPS)
    ini.start(0.0)
    out = ini.on_message(PunchConnect(1, ()), 0.1)
    assert out == [Send(PunchDone(1, False)), Send(PunchConnect(2, tuple(A_EPS)))]


@pytest.mark.parametrize("msg", [PunchSync(1), PunchDone(1, True), PunchConnect(2, ())])
def test_initiator_refuses_out_of_order_messages(msg: object) -> None:
    ini = PunchInitiator(A_EPS)
    ini.start(0.0)
    with pytest.raises(ProtocolError):
        ini.on_message(msg, 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", [PunchSync(1), PunchDone(1, True), PunchConnect(2, ()),
                                 PunchConnect(1, ())])
def test_responder_refuses_out_of_order_messages(msg: object) -> None:
    res = PunchResponder(B_EPS)
    if isinstance(msg, PunchConnect) and msg.attempt == 1:
        res.on_message(PunchConnect(1, ()), 0.0)  # a second connect for attempt 1
    with pytest.raises(ProtocolError):
        res.on_message(msg, 0.1)  # type: ignore[arg-type]


def test_responder_refuses_a_fourth_attempt() -> None:
    res = PunchResponder(B_EPS)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        res.on_message(PunchConnect(attempt, tuple(A_EPS)), 0.0)
        res.on_message(PunchSync(attempt), 0.0)
        res.on_message(PunchDone(attempt, False), 0.0)
    with pytest.raises(ProtocolError):
        res.on_message(PunchConnect(MAX_ATTEMPTS + 1, ()), 0.0)


def test_started_twice_is_refused() -> None:
    ini = PunchInitiator(A_EPS)
    ini.start(0.0)
    with pytest.raises(ProtocolError):
        ini.start(0.0)


# -- the messages: every size the peer sends is bounded -------------------------------------
def _wire(*fields: object) -> bytes:
    return packb(["pch-connect", 1, *fields])


def test_connect_round_trips_and_normalises() -> None:
    msg = decode_message(PunchConnect(2, (("::1", 9), ("198.18.0.1", 65535))).encode())
    assert msg == PunchConnect(2, (("::1", 9), ("198.18.0.1", 65535)))


@pytest.mark.parametrize("fields", [
    (1, [["198.18.0.1", 1]] * (MAX_ENDPOINTS + 1)),  # too many endpoints
    (1, [["example.com", 80]]),  # names are not dialled
    (1, [[ANY_V4, 80]]),  # the wildcard
    (1, [["224.0.0.251", 5353]]),
    (1, [["198.18.0.1", 0]]),
    (1, [["198.18.0.1", 65536]]),
    (1, [["198.18.0.1", True]]),
    (1, [["198.18.0.1"]]),
    (1, [["1" * 46, 80]]),
    (1, ["198.18.0.1:80"]),
    (0, []),
    (MAX_ATTEMPTS + 1, []),
    (1,),
])
def test_connect_refuses_bad_fields(fields: tuple[object, ...]) -> None:
    with pytest.raises(ProtocolError):
        decode_message(_wire(*fields), expect=(PunchConnect,),
                       max_bytes=MAX_PUNCH_MESSAGE_BYTES)


def test_the_largest_connect_fits_the_message_limit() -> None:
    eps = tuple(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535) for _ in range(MAX_ENDPOINTS))
    assert len(PunchConnect(MAX_ATTEMPTS, eps).encode()) <= MAX_PUNCH_MESSAGE_BYTES


def test_punch_datagram_is_never_a_udp_transport_packet() -> None:
    assert PUNCH_DATAGRAM[0] != MAGIC


# -- candidates and the cache -----------------------------------------------------------
def test_udp_candidates_local_then_observed_with_the_listener_port() -> None:
    ident = Identity.generate("b")
    record = ContactRecord.create(ident, ["198.18.2.2", "host.example"],
                                  {"tcp": 7000, "udp": 5000}, 1,
                                  observed=[("tcp", "198.18.0.12", 7000)])
    assert udp_candidates(record) == [("198.18.2.2", 5000), ("198.18.0.12", 5000)]
    no_udp = ContactRecord.create(ident, ["198.18.2.2"], {"tcp": 7000}, 2)
    assert udp_candidates(no_udp) == []


def test_punched_paths_expire_and_failures_back_off() -> None:
    peer = Identity.generate("p").peer_id
    paths = PunchedPaths(ttl_s=60.0, retry_after_s=120.0)
    assert paths.should_punch(peer, 0.0)
    paths.remember(peer, ("198.18.0.12", 5000), 0.0)
    assert not paths.should_punch(peer, 1.0)
    paths.used(peer, 50.0)  # a dial over the path keeps it fresh
    assert paths.get(peer, 100.0) == ("198.18.0.12", 5000)
    assert paths.get(peer, 111.0) is None
    assert paths.should_punch(peer, 111.0)
    paths.failed(peer, 200.0)
    assert not paths.should_punch(peer, 300.0)
    assert paths.should_punch(peer, 321.0)


def test_failed_endpoints_are_remembered_for_a_while_and_bounded() -> None:
    from node.reach.dialer import MAX_FAILED_ENDPOINTS, FailedEndpoints

    now = [0.0]
    failed = FailedEndpoints(ttl_s=60.0, clock=lambda: now[0])
    failed.add("tcp", "198.18.0.12", 7000)
    assert failed.recent("tcp", "198.18.0.12", 7000)
    assert not failed.recent("udp", "198.18.0.12", 7000)
    now[0] = 61.0
    assert not failed.recent("tcp", "198.18.0.12", 7000)
    for i in range(MAX_FAILED_ENDPOINTS + 10):
        failed.add("tcp", "198.18.0.1", i + 1)
    assert len(failed._at) == MAX_FAILED_ENDPOINTS
    assert not failed.recent("tcp", "198.18.0.1", 1)  # the oldest went first
    failed.clear("tcp", "198.18.0.1", 20)
    assert not failed.recent("tcp", "198.18.0.1", 20)
