"""The DHT `stun` RPC over real sockets on 127.0.0.1: a peer answers where it sees us."""

from __future__ import annotations

import pytest

from dht.node import DhtNode
from dht.protocol import check_stun_reply, parse_datagram
from node.errors import ProtocolError
from node.identity import Identity
from node.wire import packb

HOST = "127.0.0.1"


async def test_stun_answers_the_callers_source_address() -> None:
    a = DhtNode(Identity.generate("a"), host=HOST, port=0, rpc_timeout_s=0.5)
    b = DhtNode(Identity.generate("b"), host=HOST, port=0, rpc_timeout_s=0.5)
    await a.start()
    await b.start()
    try:
        assert await a.stun((HOST, b.port)) == (HOST, a.port)
        assert b.contact_ids() == []  # asking is not joining: b did not add a
        await b.stop()
        assert await a.stun((HOST, b.port)) is None  # silence: None after the timeout
    finally:
        await a.stop()
        await b.stop()


def test_stun_request_and_reply_shapes() -> None:
    msg_id = b"\x01" * 20
    req = parse_datagram(b"\x00" + msg_id + packb(["stun", [b"\x02" * 20]]))
    assert req.method == "stun"  # type: ignore[union-attr]
    with pytest.raises(ProtocolError):
        parse_datagram(b"\x00" + msg_id + packb(["stun", []]))
    assert check_stun_reply(["198.18.0.1", 4000]) == ("198.18.0.1", 4000)
    for bad in (["198.18.0.1"], ["not-ip", 1], ["198.18.0.1", 0], ["198.18.0.1", "1"],
                {"ip": 1}, ["x" * 100, 1]):
        with pytest.raises(ProtocolError):
            check_stun_reply(bad)
