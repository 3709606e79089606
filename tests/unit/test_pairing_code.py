"""Pairing codes, the word list, and the PAKE exchange with injected randomness."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.contact import ContactRecord
from node.errors import ProtocolError
from node.identity import Identity
from node.pairing import WrongCode
from node.pairing.code import (
    BadCode,
    Code,
    looks_like_code,
    make_code,
    parse_code,
    parse_duration_s,
)
from node.pairing.protocol import (
    PairingKeys,
    PakeSide,
    open_box,
    seal,
    verification_words,
)
from node.pairing.wordlist import EVEN_WORDS, ODD_WORDS


def stream(seed: bytes) -> Callable[[int], bytes]:
    """Deterministic 'randomness': blake2b(seed || counter) blocks."""
    buf = bytearray()
    counter = [0]

    def take(n: int) -> bytes:
        while len(buf) < n:
            buf.extend(hashlib.blake2b(seed + counter[0].to_bytes(4, "big")).digest())
            counter[0] += 1
        out = bytes(buf[:n])
        del buf[:n]
        return out

    return take


CODE = Code(7, ("crossover", "eyetooth"))


def test_word_lists_are_256_distinct_lowercase_words_each_and_disjoint() -> None:
    assert len(EVEN_WORDS) == len(set(EVEN_WORDS)) == 256
    assert len(ODD_WORDS) == len(set(ODD_WORDS)) == 256
    assert not set(EVEN_WORDS) & set(ODD_WORDS)
    assert all(w.isalpha() and w == w.lower() for w in EVEN_WORDS + ODD_WORDS)
    assert EVEN_WORDS[0] == "aardvark" and ODD_WORDS[255] == "yucatan"


def test_make_code_alternates_odd_then_even_from_the_entropy() -> None:
    code = make_code(12, entropy=lambda n: bytes([0x3C, 0x5F][:n]))
    assert str(code) == "12-crossover-eyetooth"
    assert make_code(3, count=3, entropy=lambda n: b"\x00\x00\xff").words == (
        "adroitness", "aardvark", "yucatan")


@pytest.mark.parametrize("typed", ["7-crossover-eyetooth", " 7-Crossover-EYETOOTH ",
                                   "7 crossover eyetooth", "7--crossover-eyetooth"])
def test_parse_accepts_what_people_type(typed: str) -> None:
    assert parse_code(typed) == CODE
    assert parse_code(typed).password == b"7-crossover-eyetooth"


@pytest.mark.parametrize(("typed", "says"), [
    ("", "not a pairing code"),
    ("crossover-eyetooth", "not a pairing code"),
    ("x-crossover-eyetooth", "starts with a number"),
    ("0-crossover-eyetooth", "starts with a number"),
    ("7-crossover", "not a pairing code"),
    ("7-eyetooth-crossover", "out of order"),
    ("7-crossovr-eyetooth", "check the spelling"),
    ("7-crossover-eyetooth-crossover-eyetooth", "words after the number"),
    ("7-" + "a" * 100, "at most"),
])
def test_parse_refuses_bad_codes_clearly(typed: str, says: str) -> None:
    with pytest.raises(BadCode, match=says):
        parse_code(typed)


def test_looks_like_code_tells_codes_from_ids_and_aliases() -> None:
    assert looks_like_code("7-crossover-eyetooth")
    assert not looks_like_code("alice")
    assert not looks_like_code("ABCDEFG-HIJKLMN")
    assert not looks_like_code("7")


def test_durations() -> None:
    assert [parse_duration_s(t) for t in ("90", "90s", "10m", "1h")] == [90, 90, 600, 3600]
    with pytest.raises(ValueError):
        parse_duration_s("ten minutes")


def test_pake_known_answer_with_injected_randomness() -> None:
    a, b = PakeSide(CODE, "A", stream(b"a")), PakeSide(CODE, "B", stream(b"b"))
    assert a.outbound.hex() == (
        "4144c9370a7fc529c322d3b09e1fa7f40e3dbcdc422525cb3a7d1225a6a8220218")
    assert b.outbound.hex() == (
        "422b33e4434cc8c6a2fbbfafdc913a3bbdd2c3422ec1648354b16155b1d6ba22ef")
    ka, kb = a.finish(b.outbound), b.finish(a.outbound)
    assert ka.transcript == kb.transcript
    assert ka.transcript.hex() == (
        "cdcd9d953642e556dcfa56e4de248d44b0ddd363c535aec6f7d7cd6e95293778")
    assert ka.box_mine.hex() == (
        "514d395ecfcb69f037806c4f7b605e82f6379506931bfe292adf31df39ae2704")
    assert ka.confirm_mine.hex() == (
        "c67b54ec18bde892d8db00a40b6e1e59f33aa77fafd29fc6fa4cfe8e3d75d8e5")
    assert (ka.box_mine, ka.confirm_mine) == (kb.box_theirs, kb.confirm_theirs)
    assert ka.box_mine != ka.box_theirs and ka.confirm_mine != ka.confirm_theirs


def keys_for(code_a: Code, code_b: Code) -> tuple[PairingKeys, PairingKeys]:
    a, b = PakeSide(code_a, "A"), PakeSide(code_b, "B")
    return a.finish(b.outbound), b.finish(a.outbound)


def test_box_carries_key_name_record_and_verifies() -> None:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    record = ContactRecord.create(alice, ["127.0.0.1"], {"tcp": 9000}, 5)
    ka, kb = keys_for(CODE, CODE)
    offer = open_box(kb, seal(ka, alice, "alice", record))
    assert offer.peer_id == alice.peer_id and offer.name == "alice"
    assert offer.record == record
    assert open_box(ka, seal(kb, bob, "bob", None)).peer_id == bob.peer_id


def test_wrong_code_is_detected_by_the_confirmation_on_both_sides() -> None:
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    ka, kb = keys_for(CODE, Code(7, ("crossover", "aardvark")))
    with pytest.raises(WrongCode, match="wrong code or someone tried to guess it"):
        open_box(kb, seal(ka, alice, "alice", None))
    with pytest.raises(WrongCode):
        open_box(ka, seal(kb, bob, "bob", None))


def test_tampered_or_misbound_boxes_are_refused() -> None:
    alice, mallory = Identity.generate("alice"), Identity.generate("mallory")
    ka, kb = keys_for(CODE, CODE)
    box = seal(ka, alice, "alice", None)
    flipped = box[:40] + bytes([box[40] ^ 1]) + box[41:]
    with pytest.raises(ProtocolError, match="does not decrypt"):
        open_box(kb, flipped)
    with pytest.raises(ProtocolError, match="wrong size"):
        open_box(kb, box[:10])
    # a box sealed in another pairing (other transcript) does not open here
    other_a, _ = keys_for(CODE, CODE)
    with pytest.raises(WrongCode):
        open_box(kb, seal(other_a, alice, "alice", None))
    # a record of someone else inside the box
    foreign = ContactRecord.create(mallory, ["127.0.0.1"], {"tcp": 1}, 1)
    with pytest.raises(ProtocolError, match="another key"):
        open_box(kb, seal(ka, alice, "alice", foreign))


def test_reflected_or_malformed_pake_messages_are_refused() -> None:
    a = PakeSide(CODE, "A")
    with pytest.raises(ProtocolError):
        a.finish(a.outbound)  # our own message reflected back
    with pytest.raises(ProtocolError, match="wrong size"):
        PakeSide(CODE, "A").finish(b"\x42" * 5)
    b = PakeSide(CODE, "B")
    b.finish(PakeSide(CODE, "A").outbound)
    with pytest.raises(ProtocolError, match="already finished"):
        b.finish(a.outbound)


def test_verification_words_are_the_same_on_both_sides() -> None:
    x, y = Identity.generate().public_key, Identity.generate().public_key
    words = verification_words(x, y)
    assert words == verification_words(y, x)
    assert len(words.split("-")) == 3
    assert words != verification_words(x, Identity.generate().public_key)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120))
def test_parse_code_raises_only_bad_code(text: str) -> None:
    try:
        code = parse_code(text)
    except BadCode:
        return
    assert parse_code(str(code)) == code


def test_a_box_cut_or_flipped_anywhere_is_refused() -> None:
    alice = Identity.generate("alice")
    ka, kb = keys_for(CODE, CODE)
    box = seal(ka, alice, "alice", ContactRecord.create(alice, ["127.0.0.1"], {"tcp": 9}, 1))
    for i in range(len(box)):
        for bad in (box[:i], box[:i] + bytes([box[i] ^ 0x80]) + box[i + 1:]):
            with pytest.raises((ProtocolError, WrongCode)):
                open_box(kb, bad)
