"""Relay wire messages (bootstrap/relay_proto.py) and the contact record's relay list:
round trips, bounds, and every mutation of a valid message decodes or is refused with
ProtocolError (never another exception)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootstrap.relay import RelayLimits
from bootstrap.relay_proto import (
    MAX_CONTROL_BYTES,
    Challenge,
    Connect,
    Incoming,
    Join,
    Proof,
    RelayError,
    Renew,
    Reserve,
    Reserved,
    Spliced,
    reserve_signed_bytes,
)
from node.contact import MAX_RELAYS, ContactRecord
from node.errors import ProtocolError
from node.identity import Identity
from node.reach.relay_client import parse_relay_addr
from node.wire import decode_message, packb, unpackb

VALID = [
    Reserve(os.urandom(32)), Challenge(os.urandom(32)), Proof(os.urandom(64)),
    Reserved(120, 2**32, 3600, 16), Renew(), Incoming(os.urandom(32)), Join(os.urandom(32)),
    Connect(os.urandom(32)), Spliced(2**32, 3600), RelayError("malformed", "bad request: x"),
]


@pytest.mark.parametrize("msg", VALID, ids=lambda m: m.TYPE)
def test_round_trip_and_size(msg: object) -> None:
    data = msg.encode()  # type: ignore[attr-defined]
    assert len(data) < MAX_CONTROL_BYTES
    assert decode_message(data) == msg


@pytest.mark.parametrize("cls, n", [(Reserve, 32), (Join, 32), (Connect, 32),
                                    (Incoming, 32), (Challenge, 32), (Proof, 64)])
def test_fixed_size_fields_refuse_other_lengths(cls: type, n: int) -> None:
    for bad in (n - 1, n + 1, 0):
        with pytest.raises(ProtocolError):
            decode_message(packb([cls.TYPE, 1, os.urandom(bad)]))


def test_wrong_version_and_types_are_refused() -> None:
    with pytest.raises(ProtocolError, match="version"):
        decode_message(packb(["rly-reserve", 2, os.urandom(32)]))
    with pytest.raises(ProtocolError):
        decode_message(packb(["rly-reserved", 1, -1, 1, 1, 1]))
    with pytest.raises(ProtocolError):
        decode_message(packb(["rly-error", 1, "x", "r" * 500]))
    with pytest.raises(ProtocolError):
        decode_message(packb(["rly-reserved", 1, True, 1, 1, 1]))


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(VALID) - 1), pos=st.integers(0, 200),
       byte=st.integers(0, 255), cut=st.booleans())
def test_mutated_valid_messages_decode_or_raise_protocol_error(index: int, pos: int,
                                                               byte: int, cut: bool) -> None:
    data = bytearray(VALID[index].encode())
    pos %= len(data)
    if cut:
        del data[pos:]
    else:
        data[pos] = byte
    try:
        decode_message(bytes(data), max_bytes=MAX_CONTROL_BYTES)
    except ProtocolError:
        pass


def test_reservation_proof_binds_nonce_and_key() -> None:
    ident = Identity.generate("n")
    nonce = os.urandom(32)
    sig = ident.sign(reserve_signed_bytes(nonce, ident.peer_id.key))
    assert ident.peer_id.verify(reserve_signed_bytes(nonce, ident.peer_id.key), sig)
    assert not ident.peer_id.verify(reserve_signed_bytes(os.urandom(32), ident.peer_id.key), sig)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_circuit_bytes"):
        RelayLimits(max_circuit_bytes=0)


@pytest.mark.parametrize("text", ["relay", ":80", "h:0", "h:70000", "h:x", "a b:1",
                                  "h" * 90 + ":1"])
def test_bad_relay_addresses_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_relay_addr(text)


def test_relay_address_forms() -> None:
    assert parse_relay_addr("198.18.0.1:8474") == ("198.18.0.1", 8474)
    assert parse_relay_addr("[::1]:9") == ("::1", 9)


# -- contact record: the relays extension -------------------------------------------------
def test_record_without_relays_signs_and_encodes_as_before() -> None:
    ident = Identity.generate("old")
    rec = ContactRecord.create(ident, ["127.0.0.1"], {"tcp": 1}, 5)
    wire = unpackb(rec.encode())
    assert len(wire) == 8  # exactly the pre-extension layout: old readers still accept it
    assert len(unpackb(rec.signed_bytes())) == 8
    assert "relays" not in rec.to_json()


def test_record_with_relays_round_trips_and_is_signed() -> None:
    ident = Identity.generate("natted")
    rec = ContactRecord.create(ident, ["198.18.1.2"], {"tcp": 1}, 5,
                               relays=["198.18.0.1:8474"])
    for back in (ContactRecord.decode(rec.encode()), ContactRecord.from_json(rec.to_json())):
        assert back == rec and back.verify().relays == ("198.18.0.1:8474",)
    # a relay list swapped in by someone else breaks the signature
    wire = unpackb(rec.encode())
    wire[8] = {"relays": ["203.0.113.9:1"]}
    with pytest.raises(ProtocolError, match="signature"):
        ContactRecord.decode(packb(wire)).verify()
    # stripping the relays breaks it too
    with pytest.raises(ProtocolError, match="signature"):
        ContactRecord.decode(packb(wire[:8])).verify()


@pytest.mark.parametrize("ext", [{}, {"relays": []}, {"other": 1}, {"relays": ["x" * 81]},
                                 {"relays": [f"h:{i}" for i in range(1, MAX_RELAYS + 2)]},
                                 {"relays": [1]}, ["h:1"]])
def test_bad_relay_extensions_are_refused(ext: object) -> None:
    ident = Identity.generate("n")
    wire = unpackb(ContactRecord.create(ident, ["h"], {"tcp": 1}, 1).encode())
    with pytest.raises(ProtocolError):
        ContactRecord.from_wire([*wire, ext])
