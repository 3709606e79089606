"""Unit tests of node/secure.py: the handshake and frame crypto, no sockets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import msgpack
import nacl.bindings as sodium
import nacl.hash
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.encoding import RawEncoder

from node.errors import HandshakeError, ProtocolError
from node.identity import Identity
from node.secure import (
    FRAME_OVERHEAD_BYTES,
    PROTOCOL_NAME,
    Finish,
    Hello,
    HelloReply,
    InitiatorHandshake,
    InitiatorState,
    ResponderHandshake,
    ResponderState,
    Session,
    SessionState,
)
from node.wire import packb

ALICE = Identity.generate("alice", seed=bytes(range(32)))
BOB = Identity.generate("bob", seed=bytes(range(32, 64)))
MALLORY = Identity.generate("mallory", seed=bytes(range(64, 96)))


def det_rand(tag: bytes) -> Callable[[int], bytes]:
    counter = [0]

    def rand(n: int) -> bytes:
        counter[0] += 1
        return hashlib.blake2b(tag + bytes([counter[0]]), digest_size=n).digest()

    return rand


def handshake(
    init_id: Identity = ALICE, resp_id: Identity = BOB, **kw: object
) -> tuple[Session, Session, tuple[bytes, bytes, bytes]]:
    i = InitiatorHandshake(init_id, **kw)  # type: ignore[arg-type]
    r = ResponderHandshake(resp_id)
    m1 = i.start()
    m2 = r.receive_hello(m1)
    m3, si = i.receive(m2)
    sr = r.receive_finish(m3)
    return si, sr, (m1, m2, m3)


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index % len(b)] ^= 0x01
    return bytes(b)


# --- success --------------------------------------------------------------------


def test_handshake_authenticates_both_sides_and_agrees_on_keys() -> None:
    si, sr, _ = handshake(expected_peer=BOB.peer_id)
    assert si.peer == BOB.peer_id and sr.peer == ALICE.peer_id
    assert si.peer_name == "bob" and sr.peer_name == "alice"
    assert si.transcript_hash == sr.transcript_hash and len(si.transcript_hash) == 32
    assert sr.open(si.seal(b"to bob")) == b"to bob"
    assert si.open(sr.seal(b"to alice")) == b"to alice"
    for n in range(5):
        assert sr.open(si.seal(bytes([n]) * n)) == bytes([n]) * n


def test_each_handshake_has_fresh_keys() -> None:
    s1, _, _ = handshake()
    s2, _, _ = handshake()
    assert s1.transcript_hash != s2.transcript_hash
    assert s1.seal(b"same") != s2.seal(b"same")


def test_directions_use_separate_keys() -> None:
    si, _, _ = handshake()
    frame = si.seal(b"x")
    # alice's own receive direction must not accept her own frame (reflection)
    with pytest.raises(ProtocolError):
        si.open(frame)


def test_nothing_secret_in_clear() -> None:
    _, _, (m1, m2, m3) = handshake()
    for m in (m1, m2, m3):
        assert ALICE.public_key not in m and BOB.public_key not in m
        assert b"alice" not in m and b"bob" not in m


# --- known answer -----------------------------------------------------------------

KAT_MSG_SHA256 = (
    "a96b50432f206d92952e552504cd47b7de9016e823419edd6845f9ab81505d48",
    "16d3dfdb8da6036e281a41e113699de78b8b652da1d31a02be3846bf1e807ab0",
    "4ec8af7a24b35c2e3a7d2cf76997fd2874ea2823d233b615113b9a25a273f17d",
)
KAT_TRANSCRIPT = "06cd80586bf7cf3941ba08a910dad2a743d214d615d0801f7616ec1d1f4ed457"
KAT_FRAME_I2R = "65582acb183cf2abc2f30538640fa501abb6494875635cf63976db49"
KAT_FRAME_R2I = "da8aa07fc14fe0675f8318444a5faec70fc1dbbb62"


def _h(data: bytes, key: bytes = b"", person: bytes = b"p2pfs-transcript") -> bytes:
    return nacl.hash.blake2b(data, digest_size=32, key=key, person=person, encoder=RawEncoder)


def test_known_answer_vectors_with_pinned_randomness() -> None:
    i = InitiatorHandshake(ALICE, rand=det_rand(b"I"))
    r = ResponderHandshake(BOB, rand=det_rand(b"R"))
    m1 = i.start()
    m2 = r.receive_hello(m1)
    m3, si = i.receive(m2)
    sr = r.receive_finish(m3)
    got = tuple(hashlib.sha256(m).hexdigest() for m in (m1, m2, m3))
    assert got == KAT_MSG_SHA256
    assert si.transcript_hash.hex() == KAT_TRANSCRIPT == sr.transcript_hash.hex()
    assert si.seal(b"known answer").hex() == KAT_FRAME_I2R
    assert sr.seal(b"reply").hex() == KAT_FRAME_R2I


def test_key_schedule_matches_the_documented_construction() -> None:
    """Re-derive the session keys from libsodium primitives, as the README's Security
    section says."""
    rand_i, rand_r = det_rand(b"I"), det_rand(b"R")
    i = InitiatorHandshake(ALICE, rand=det_rand(b"I"))
    r = ResponderHandshake(BOB, rand=det_rand(b"R"))
    m1 = i.start()
    m2 = r.receive_hello(m1)
    m3, si = i.receive(m2)
    e_i, sk_i = sodium.crypto_kx_seed_keypair(rand_i(32))
    e_r, _ = sodium.crypto_kx_seed_keypair(rand_r(32))
    hello = msgpack.unpackb(m1)
    reply = msgpack.unpackb(m2)
    assert hello[:4] == ["hs1", 1, PROTOCOL_NAME, [1]] and hello[4] == e_i
    assert reply[2:4] == [1, e_r]
    rx, tx = sodium.crypto_kx_client_session_keys(e_i, sk_i, e_r)
    t1 = _h(PROTOCOL_NAME.encode() + m1)
    t2 = _h(t1 + packb([1, e_r]))
    t3 = _h(t2 + reply[4])
    t4 = _h(t3 + m3)
    assert si.transcript_hash == t4
    # responder's identity box opens with the documented handshake key
    box = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
        reply[4], t2, bytes(24), _h(t2, key=rx, person=b"p2pfs-hs-r2i"))
    assert msgpack.unpackb(box)[:2] == [BOB.public_key, "bob"]
    k_i2r = _h(t4, key=tx, person=b"p2pfs-app-i2r")
    nonce = bytes(16) + (0).to_bytes(8, "big")
    expect = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(b"abc", None, nonce, k_i2r)
    assert si.seal(b"abc") == expect


# --- tampering each handshake message --------------------------------------------


@pytest.mark.parametrize("which", [0, 1, 2])
def test_tampering_any_byte_of_any_message_fails_the_handshake(which: int) -> None:
    _, _, msgs = handshake()
    for index in range(len(msgs[which])):
        i = InitiatorHandshake(ALICE)
        r = ResponderHandshake(BOB)
        m1 = i.start()
        if which == 0:
            m1 = flip(m1, index)
        with pytest.raises(HandshakeError):
            m2 = r.receive_hello(m1)
            if which == 1:
                m2 = flip(m2, index)
            m3, si = i.receive(m2)
            if which == 2:
                m3 = flip(m3, index)
            sr = r.receive_finish(m3)
            # a flip that survives decoding must still leave the sessions disagreeing
            if si.transcript_hash != sr.transcript_hash:
                raise HandshakeError("transcripts differ")
            sr.open(si.seal(b"x"))


def test_wrong_expected_peer_is_refused() -> None:
    with pytest.raises(HandshakeError, match="different key than its record claims"):
        handshake(expected_peer=MALLORY.peer_id)


def test_mitm_swapping_ephemerals_fails() -> None:
    """Mallory relays but substitutes her own ephemeral keys both ways."""
    i = InitiatorHandshake(ALICE, expected_peer=BOB.peer_id)
    r = ResponderHandshake(BOB)
    m1 = msgpack.unpackb(i.start())
    m1[4] = sodium.crypto_kx_keypair()[0]
    m2 = r.receive_hello(msgpack.packb(m1))
    m2l = msgpack.unpackb(m2)
    m2l[3] = sodium.crypto_kx_keypair()[0]
    with pytest.raises(HandshakeError):
        i.receive(msgpack.packb(m2l))


def test_mitm_with_own_identity_is_detected_by_expected_peer() -> None:
    # Mallory answers Alice herself: a valid handshake, but with the wrong key
    i = InitiatorHandshake(ALICE, expected_peer=BOB.peer_id)
    m = ResponderHandshake(MALLORY)
    with pytest.raises(HandshakeError, match="different key"):
        i.receive(m.receive_hello(i.start()))


def test_reflected_hello_reply_fails() -> None:
    """msg2 of one session replayed into another session fails."""
    i1, r1 = InitiatorHandshake(ALICE), ResponderHandshake(BOB)
    i2 = InitiatorHandshake(ALICE)
    i2.start()
    m2 = r1.receive_hello(i1.start())
    with pytest.raises(HandshakeError):
        i2.receive(m2)


def test_unknown_versions_are_refused_both_ways() -> None:
    i = InitiatorHandshake(ALICE, versions=(7, 8))
    r = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError, match="no common protocol version"):
        r.receive_hello(i.start())
    abort = ResponderHandshake.abort_message("no common protocol version")
    with pytest.raises(HandshakeError, match="peer refused the handshake: no common"):
        i.receive(abort)
    # a responder choosing a version we never offered
    i = InitiatorHandshake(ALICE)
    m1 = i.start()
    r = ResponderHandshake(BOB, versions=(1,))
    m2 = msgpack.unpackb(r.receive_hello(m1))
    m2[2] = 2
    with pytest.raises(HandshakeError, match="did not offer"):
        i.receive(msgpack.packb(m2))


def test_wrong_protocol_name_refused() -> None:
    msg = packb(["hs1", 1, "other-proto", [1], bytes(32), bytes(32)])
    assert msgpack.unpackb(Hello(PROTOCOL_NAME, (1,), bytes(32), bytes(32)).encode())[2] == (
        PROTOCOL_NAME)
    with pytest.raises(HandshakeError, match="not 'p2pfs-secure'"):
        ResponderHandshake(BOB).receive_hello(msg)


def test_illegal_transitions_raise() -> None:
    i = InitiatorHandshake(ALICE)
    with pytest.raises(HandshakeError, match="cannot go"):
        i.receive(b"\x90")
    r = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError, match="cannot go"):
        r.receive_finish(Finish(b"x").encode())
    _, _, (m1, _, _) = handshake()
    i = InitiatorHandshake(ALICE)
    i.start()
    with pytest.raises(HandshakeError):
        i.start()
    r = ResponderHandshake(BOB)
    r.receive_hello(m1)
    with pytest.raises(HandshakeError):
        r.receive_hello(m1)


def test_failed_machine_stays_failed() -> None:
    i = InitiatorHandshake(ALICE)
    i.start()
    with pytest.raises(HandshakeError):
        i.receive(b"garbage")
    assert i.state is InitiatorState.FAILED
    with pytest.raises(HandshakeError):
        i.receive(HelloReply(1, bytes(32), b"").encode())
    r = ResponderHandshake(BOB)
    with pytest.raises(HandshakeError):
        r.receive_hello(b"\xc1")
    assert r.state is ResponderState.FAILED


def test_oversize_handshake_message_refused() -> None:
    with pytest.raises(HandshakeError, match="exceeds"):
        ResponderHandshake(BOB).receive_hello(b"\x00" * 10_000)


# --- frames -------------------------------------------------------------------------


def test_replayed_frame_kills_session() -> None:
    si, sr, _ = handshake()
    f = si.seal(b"once")
    assert sr.open(f) == b"once"
    with pytest.raises(ProtocolError, match="failed authentication"):
        sr.open(f)
    assert sr.state is SessionState.DEAD
    with pytest.raises(ProtocolError, match="dead"):
        sr.open(si.seal(b"next"))
    with pytest.raises(ProtocolError, match="dead"):
        sr.seal(b"reply")


def test_reordered_frames_kill_session() -> None:
    si, sr, _ = handshake()
    f0, f1 = si.seal(b"0"), si.seal(b"1")
    with pytest.raises(ProtocolError):
        sr.open(f1)
    with pytest.raises(ProtocolError, match="dead"):
        sr.open(f0)


@pytest.mark.parametrize("mutate", [
    lambda f: f[:-1],
    lambda f: f[:3],
    lambda f: b"",
    lambda f: flip(f, 0),
    lambda f: flip(f, -1),
    lambda f: f + b"\x00",
])
def test_forged_or_truncated_frames_kill_session(mutate: Callable[[bytes], bytes]) -> None:
    si, sr, _ = handshake()
    with pytest.raises(ProtocolError):
        sr.open(mutate(si.seal(b"payload bytes")))
    assert sr.state is SessionState.DEAD


def test_frame_overhead_is_the_tag_only() -> None:
    si, _, _ = handshake()
    assert len(si.seal(b"x" * 1000)) == 1000 + FRAME_OVERHEAD_BYTES


# --- decoders never raise anything but ProtocolError ----------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_into_responder_hello(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ResponderHandshake(BOB).receive_hello(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_into_initiator_reply(data: bytes) -> None:
    i = InitiatorHandshake(ALICE)
    i.start()
    with pytest.raises(ProtocolError):
        i.receive(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_into_responder_finish(data: bytes) -> None:
    i, r = InitiatorHandshake(ALICE), ResponderHandshake(BOB)
    r.receive_hello(i.start())
    with pytest.raises(ProtocolError):
        r.receive_finish(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.integers(-3, 2**64 - 1), st.text(max_size=8),
                          st.none(), st.booleans(), st.lists(st.integers(-1, 9), max_size=9)),
                max_size=7))
def test_structured_garbage_into_decoders(fields: list[object]) -> None:
    for prefix in (["hs1", 1], ["hs2", 1], ["hs3", 1], ["hs-abort", 1]):
        data = packb(prefix + fields)
        with pytest.raises(ProtocolError):
            ResponderHandshake(BOB).receive_hello(data)
        i = InitiatorHandshake(ALICE)
        i.start()
        with pytest.raises(ProtocolError):
            i.receive(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_frames_never_open(data: bytes) -> None:
    _, sr, _ = handshake()
    with pytest.raises(ProtocolError):
        sr.open(data)


def test_open_accepts_bytearray_frames_from_zero_copy_transports() -> None:
    si, sr, _ = handshake()
    assert sr.open(bytearray(si.seal(b"from a buffer"))) == b"from a buffer"
    with pytest.raises(ProtocolError):
        sr.open(bytearray(si.seal(b"x"))[:-1])


# --- zero-copy frame paths (seal_into / open_in_place) ----------------------------


def twin_senders() -> tuple[Session, Session, Session]:
    """Two sessions with the same send key and counter, and the matching receiver."""
    si, sr, _ = handshake()
    twin = Session(peer=si.peer, peer_name="", version=1, transcript_hash=b"",
                   send_key=si._send_key, recv_key=si._recv_key)
    return si, twin, sr


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000, (1 << 20) + 3])
def test_seal_into_writes_exactly_the_frame_seal_returns(size: int) -> None:
    si, twin, sr = twin_senders()
    msg = bytes(i % 251 for i in range(size))
    expected = si.seal(msg)
    out = bytearray(b"\xee" * (7 + size + FRAME_OVERHEAD_BYTES + 5))
    assert twin.seal_into(msg, out, 7) == size + FRAME_OVERHEAD_BYTES
    assert out[7:-5] == expected
    assert out[:7] == b"\xee" * 7 and out[-5:] == b"\xee" * 5  # nothing outside the frame
    assert sr.open(out[7:-5]) == msg


def test_seal_into_accepts_bytes_like_plaintext_and_memoryview_output() -> None:
    si, sr, _ = handshake()
    out = bytearray(64)
    n = si.seal_into(bytearray(b"abc"), memoryview(out)[10:], 0)
    assert sr.open(bytes(out[10:10 + n])) == b"abc"
    n = si.seal_into(memoryview(b"xyzw")[1:], out, 0)
    assert sr.open(out[:n]) == b"yzw"


def test_seal_into_without_room_raises_and_burns_no_nonce() -> None:
    si, sr, _ = handshake()
    with pytest.raises(ValueError, match="room"):
        si.seal_into(b"x" * 100, bytearray(100 + FRAME_OVERHEAD_BYTES - 1))
    with pytest.raises(ValueError, match="room"):
        si.seal_into(b"x", bytearray(100), 90)
    with pytest.raises(ValueError):
        si.seal_into(b"x", bytearray(100), -1)
    assert si.state is SessionState.OPEN
    assert sr.open(si.seal(b"first")) == b"first"  # counter 0 still unused before


def test_open_in_place_returns_the_same_buffer_without_its_tag() -> None:
    si, sr, _ = handshake()
    msg = bytes(range(256)) * 300
    frame = bytearray(si.seal(msg))
    plain = sr.open_in_place(frame)
    assert plain is frame and plain == msg and len(plain) == len(msg)
    second = bytearray(si.seal(b""))
    assert sr.open_in_place(second) == b""


def test_open_in_place_with_a_live_view_returns_a_correct_copy() -> None:
    si, sr, _ = handshake()
    frame = bytearray(si.seal(b"viewed"))
    view = memoryview(frame)
    plain = sr.open_in_place(frame)
    assert plain == b"viewed" and plain is not frame
    view.release()


@pytest.mark.parametrize("mutate", [
    lambda f: f[:-1],
    lambda f: f[:FRAME_OVERHEAD_BYTES - 1],
    lambda f: bytearray(),
    lambda f: bytearray(flip(bytes(f), 0)),
    lambda f: bytearray(flip(bytes(f), -1)),
    lambda f: f + b"\x00",
])
def test_open_in_place_rejects_forged_or_truncated_frames(
        mutate: Callable[[bytearray], bytearray]) -> None:
    si, sr, _ = handshake()
    frame = mutate(bytearray(si.seal(b"payload bytes" * 10_000)))
    with pytest.raises(ProtocolError):
        sr.open_in_place(frame)
    assert sr.state is SessionState.DEAD
    assert b"payload" not in frame  # never any unauthenticated plaintext left behind
    with pytest.raises(ProtocolError, match="dead"):
        sr.open_in_place(bytearray(si.seal(b"next")))


def test_open_in_place_detects_replay_and_reorder() -> None:
    si, sr, _ = handshake()
    f0, f1 = si.seal(b"0" * 100_000), si.seal(b"1" * 100_000)
    assert sr.open_in_place(bytearray(f0)) == b"0" * 100_000
    with pytest.raises(ProtocolError, match="failed authentication"):
        sr.open_in_place(bytearray(f0))  # replay
    si2, sr2, _ = handshake()
    g0, g1 = si2.seal(b"a"), si2.seal(b"b")
    with pytest.raises(ProtocolError):
        sr2.open_in_place(bytearray(g1))  # reorder
    del f1, g0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_frames_never_open_in_place(data: bytes) -> None:
    _, sr, _ = handshake()
    with pytest.raises(ProtocolError):
        sr.open_in_place(bytearray(data))
