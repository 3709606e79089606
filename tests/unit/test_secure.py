"""Unit tests of node/secure.py: the handshake and frame crypto, no sockets."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import msgpack
import nacl.bindings as sodium
import nacl.hash
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.encoding import RawEncoder

from node import secure
from node.errors import ConfigError, HandshakeError, ProtocolError
from node.identity import Identity
from node.secure import (
    AEAD_AES256GCM,
    AEAD_CHACHA20POLY1305,
    AEAD_ENV_VAR,
    FRAME_OVERHEAD_BYTES,
    KNOWN_AEADS,
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
    cpu_has_aes,
    local_aeads,
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
    init_id: Identity = ALICE, resp_id: Identity = BOB, *, responder_aeads: tuple[str, ...]
    | None = None, responder_binding: bytes = b"", **kw: object
) -> tuple[Session, Session, tuple[bytes, bytes, bytes]]:
    i = InitiatorHandshake(init_id, **kw)  # type: ignore[arg-type]
    r = ResponderHandshake(resp_id, aeads=responder_aeads, channel_binding=responder_binding)
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

# pinned randomness; the initiator offers one AEAD, the responder both
KAT: dict[str, tuple[tuple[str, str, str], str, str, str]] = {
    AEAD_AES256GCM: (
        ("88555bb2a09af137e7b48620fd067fa215d06666e0d999e74b08f1158a0f8594",
         "7dd46885d5c7249c0da13f00fe26825a3e33eacdb84e7d83925a7938026ed528",
         "dfc059ec4b02469ae002a830d067e35fe5585032b0f94cc4cc5816b40f6d224d"),
        "c3fb061f6eca6c7d265fa9303b3301189c291b227a60193f332dc564d386c2b0",
        "afc6babeddf40b90872b8f0db304f8c12215f50edf5ac5bacb86a436",
        "4d15d865b57739c242424f2f3b6e6356322c2981b6"),
    AEAD_CHACHA20POLY1305: (
        ("54b1647bab702d31024fbc53c936b9db39a5eabd060635fa1f8001ce57015c4e",
         "14f2eac456b5987db45529750e42ffcd89b6c830dc2739b4465e333583ca913d",
         "bba1ee3c3041f9ecd3366ce24b064acb9c7e8f685bd9d6521446b212fd72b7ae"),
        "e863c933c2fcc08eea0496de7246b33659f7135cc28fcd1598883a6883e64973",
        "c17f7123b39960bdb946e5bf987e67b6316a6e087fd3604d4f44f4c0",
        "b706e9b008e10591cb4840ab3883e5ba4d0a1821b2"),
}


def _h(data: bytes, key: bytes = b"", person: bytes = b"p2pfs-transcript") -> bytes:
    return nacl.hash.blake2b(data, digest_size=32, key=key, person=person, encoder=RawEncoder)


def pinned(aead: str) -> tuple[Session, Session, tuple[bytes, bytes, bytes]]:
    i = InitiatorHandshake(ALICE, rand=det_rand(b"I"), aeads=(aead,))
    r = ResponderHandshake(BOB, rand=det_rand(b"R"), aeads=KNOWN_AEADS)
    m1 = i.start()
    m2 = r.receive_hello(m1)
    m3, si = i.receive(m2)
    sr = r.receive_finish(m3)
    return si, sr, (m1, m2, m3)


@pytest.mark.parametrize("aead", KNOWN_AEADS)
def test_known_answer_vectors_with_pinned_randomness(aead: str) -> None:
    msg_sha256, transcript, frame_i2r, frame_r2i = KAT[aead]
    si, sr, msgs = pinned(aead)
    assert si.aead == sr.aead == aead
    assert tuple(hashlib.sha256(m).hexdigest() for m in msgs) == msg_sha256
    assert si.transcript_hash.hex() == transcript == sr.transcript_hash.hex()
    assert si.seal(b"known answer").hex() == frame_i2r
    assert sr.seal(b"reply").hex() == frame_r2i


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 8446 §7.1 HKDF-Expand-Label, empty context, written out here independently."""
    full = b"p2pfs " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def _frame(aead: str, secret: bytes, counter: int, plaintext: bytes) -> bytes:
    key, iv = _expand_label(secret, b"key", 32), _expand_label(secret, b"iv", 12)
    nonce = bytes(a ^ b for a, b in zip(iv, counter.to_bytes(12, "big"), strict=True))
    cls = AESGCM if aead == AEAD_AES256GCM else ChaCha20Poly1305
    return cls(key).encrypt(nonce, plaintext, None)


@pytest.mark.parametrize("aead", KNOWN_AEADS)
def test_key_schedule_matches_the_documented_construction(aead: str) -> None:
    """Re-derive the traffic secrets from libsodium primitives and every frame from
    cryptography's AEAD, as the module docstring says."""
    rand_i, rand_r = det_rand(b"I"), det_rand(b"R")
    si, _, (m1, m2, m3) = pinned(aead)
    e_i, sk_i = sodium.crypto_kx_seed_keypair(rand_i(32))
    e_r, _ = sodium.crypto_kx_seed_keypair(rand_r(32))
    hello = msgpack.unpackb(m1)
    reply = msgpack.unpackb(m2)
    assert hello[:5] == ["hs1", 2, PROTOCOL_NAME, [2], [aead]] and hello[5] == e_i
    assert reply[2:6] == [2, aead, list(KNOWN_AEADS), e_r]
    rx, tx = sodium.crypto_kx_client_session_keys(e_i, sk_i, e_r)
    t1 = _h(PROTOCOL_NAME.encode() + m1)
    t2 = _h(t1 + packb([2, aead, list(KNOWN_AEADS), e_r, b""]))
    t3 = _h(t2 + reply[6])
    t4 = _h(t3 + m3)
    assert si.transcript_hash == t4
    # responder's identity box opens with the documented handshake key
    box = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
        reply[6], t2, bytes(24), _h(t2, key=rx, person=b"p2pfs-hs-r2i"))
    assert msgpack.unpackb(box)[:2] == [BOB.public_key, "bob"]
    secret = _h(t4, key=tx, person=b"p2pfs-app-i2r")
    assert si.seal(b"abc") == _frame(aead, secret, 0, b"abc")
    assert si.seal(b"") == _frame(aead, secret, 1, b"")
    assert si.overhead_bytes == FRAME_OVERHEAD_BYTES == 16


def test_aeads_are_the_standard_ones() -> None:
    """Our names map to the standard constructions (RFC 8439 §2.8.2 vector for ChaCha20-
    Poly1305; AES-256-GCM NIST GCMVS-style vector from McGrew & Viega, test case 16)."""
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
          b"for the future, sunscreen would be it.")
    tag = ChaCha20Poly1305(key).encrypt(nonce, pt, aad)[-16:]
    assert tag.hex() == "1ae10b594f09e26a7e902ecbd0600691"
    gcm_key = bytes.fromhex("feffe9928665731c6d6a8f9467308308" * 2)
    gcm_iv = bytes.fromhex("cafebabefacedbaddecaf888")
    gcm_pt = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
        "49a6b525b16aedf5aa0de657ba637b39")
    gcm_aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    assert AESGCM(gcm_key).encrypt(gcm_iv, gcm_pt, gcm_aad)[-16:].hex() == (
        "76fc6ece0f4e1768cddf8853bb2d551b")


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
    m1[5] = sodium.crypto_kx_keypair()[0]
    m2 = r.receive_hello(msgpack.packb(m1))
    m2l = msgpack.unpackb(m2)
    m2l[5] = sodium.crypto_kx_keypair()[0]
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
    with pytest.raises(HandshakeError, match="peer speaks protocol v8, this node v2"):
        r.receive_hello(i.start())
    abort = ResponderHandshake.abort_message("peer speaks protocol v8, this node v2")
    with pytest.raises(HandshakeError, match="peer refused the handshake: peer speaks"):
        i.receive(abort)
    # a responder choosing a version we never offered
    i = InitiatorHandshake(ALICE)
    m1 = i.start()
    r = ResponderHandshake(BOB)
    m2 = msgpack.unpackb(r.receive_hello(m1))
    m2[2] = 3
    with pytest.raises(HandshakeError, match="did not offer"):
        i.receive(msgpack.packb(m2))


def test_wrong_protocol_name_refused() -> None:
    msg = packb(["hs1", 2, "other-proto", [2], [AEAD_AES256GCM], bytes(32), bytes(32)])
    assert msgpack.unpackb(Hello(PROTOCOL_NAME, (2,), (AEAD_AES256GCM,), bytes(32),
                                 bytes(32)).encode())[2] == PROTOCOL_NAME
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
        i.receive(HelloReply(2, AEAD_AES256GCM, (AEAD_AES256GCM,), bytes(32), b"").encode())
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
@pytest.mark.parametrize("aead", KNOWN_AEADS)
def test_forged_or_truncated_frames_kill_session(mutate: Callable[[bytes], bytes],
                                                 aead: str) -> None:
    si, sr, _ = handshake(aeads=(aead,))
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
    twin = Session(peer=si.peer, peer_name="", version=2, transcript_hash=b"", aead=si.aead,
                   send_secret=si._send.secret, recv_secret=si._recv.secret)
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
@pytest.mark.parametrize("aead", KNOWN_AEADS)
def test_open_in_place_rejects_forged_or_truncated_frames(
        mutate: Callable[[bytearray], bytearray], aead: str) -> None:
    si, sr, _ = handshake(aeads=(aead,))
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


# --- AEAD negotiation -------------------------------------------------------------------

X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme sse2 aes avx2 pclmulqdq\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
NO_AES_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme sse2 avx2 aesx\nmodel name\t: aes lookalike\n"


def test_hardware_aes_is_read_from_cpu_flags() -> None:
    assert cpu_has_aes(X86_CPUINFO) and cpu_has_aes(ARM_CPUINFO)
    assert not cpu_has_aes(NO_AES_CPUINFO) and not cpu_has_aes("")


def test_local_offer_follows_the_cpu_and_the_env_override() -> None:
    both = (AEAD_AES256GCM, AEAD_CHACHA20POLY1305)
    assert local_aeads({}, hardware_aes=True) == both
    assert local_aeads({}, hardware_aes=False) == (AEAD_CHACHA20POLY1305,)
    assert local_aeads({AEAD_ENV_VAR: "auto"}, hardware_aes=True) == both
    assert local_aeads({AEAD_ENV_VAR: "chacha20"}, hardware_aes=True) == (AEAD_CHACHA20POLY1305,)
    assert local_aeads({AEAD_ENV_VAR: "AES-256-GCM"}, hardware_aes=False) == (AEAD_AES256GCM,)
    with pytest.raises(ConfigError, match="P2PFS_AEAD='rot13'"):
        local_aeads({AEAD_ENV_VAR: "rot13"})


def test_env_override_reaches_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AEAD_ENV_VAR, "chacha20")
    si, sr, _ = handshake()
    assert si.aead == sr.aead == AEAD_CHACHA20POLY1305


@pytest.mark.parametrize(("initiator", "responder", "chosen"), [
    ((AEAD_AES256GCM, AEAD_CHACHA20POLY1305), (AEAD_AES256GCM, AEAD_CHACHA20POLY1305),
     AEAD_AES256GCM),  # both have hardware AES
    ((AEAD_AES256GCM, AEAD_CHACHA20POLY1305), (AEAD_CHACHA20POLY1305,),
     AEAD_CHACHA20POLY1305),  # the responder has none
    ((AEAD_CHACHA20POLY1305,), (AEAD_AES256GCM, AEAD_CHACHA20POLY1305),
     AEAD_CHACHA20POLY1305),  # the initiator has none
    ((AEAD_CHACHA20POLY1305, AEAD_AES256GCM), (AEAD_AES256GCM, AEAD_CHACHA20POLY1305),
     AEAD_CHACHA20POLY1305),  # the initiator's order wins
])
def test_negotiation_picks_the_initiators_first_common_aead(
        initiator: tuple[str, ...], responder: tuple[str, ...], chosen: str) -> None:
    si, sr, _ = handshake(aeads=initiator, responder_aeads=responder)
    assert si.aead == sr.aead == chosen
    assert sr.open(si.seal(b"agreed")) == b"agreed" and si.open(sr.seal(b"yes")) == b"yes"


def test_peer_offering_no_common_aead_is_refused_cleanly() -> None:
    i = InitiatorHandshake(ALICE, aeads=(AEAD_AES256GCM,))
    r = ResponderHandshake(BOB, aeads=(AEAD_CHACHA20POLY1305,))
    with pytest.raises(HandshakeError, match=r"no common frame AEAD: peer offers \['aes256gcm'\]"):
        r.receive_hello(i.start())
    assert r.state is ResponderState.FAILED
    # unknown names (a newer node's AEADs) are ignored, not an error
    hello = msgpack.unpackb(InitiatorHandshake(ALICE).start())
    hello[4] = ["future-aead", AEAD_CHACHA20POLY1305]
    reply = msgpack.unpackb(ResponderHandshake(BOB).receive_hello(msgpack.packb(hello)))
    assert reply[3] == AEAD_CHACHA20POLY1305
    hello[4] = ["future-aead"]
    with pytest.raises(HandshakeError, match="no common frame AEAD"):
        ResponderHandshake(BOB).receive_hello(msgpack.packb(hello))


def test_downgrade_by_stripping_aes_from_the_offer_is_detected() -> None:
    """A man in the middle removes AES from msg1: the responder's signature over T2 (which
    covers msg1) no longer verifies for the initiator."""
    i = InitiatorHandshake(ALICE, aeads=(AEAD_AES256GCM, AEAD_CHACHA20POLY1305))
    r = ResponderHandshake(BOB, aeads=(AEAD_AES256GCM, AEAD_CHACHA20POLY1305))
    hello = msgpack.unpackb(i.start())
    hello[4] = [AEAD_CHACHA20POLY1305]
    reply = msgpack.unpackb(r.receive_hello(msgpack.packb(hello)))
    assert reply[3] == AEAD_CHACHA20POLY1305  # the responder was fooled ...
    with pytest.raises(HandshakeError, match="peer chose frame AEAD"):
        i.receive(msgpack.packb(reply))  # ... the initiator is not
    # the attacker also strips AES from the responder's list, so the choice looks right
    i = InitiatorHandshake(ALICE, aeads=(AEAD_AES256GCM, AEAD_CHACHA20POLY1305))
    hello = msgpack.unpackb(i.start())
    hello[4] = [AEAD_CHACHA20POLY1305]
    reply = msgpack.unpackb(ResponderHandshake(BOB).receive_hello(msgpack.packb(hello)))
    reply[4] = [AEAD_CHACHA20POLY1305]
    with pytest.raises(HandshakeError, match="failed to decrypt"):
        i.receive(msgpack.packb(reply))


def test_downgrade_by_rewriting_the_reply_is_detected() -> None:
    i = InitiatorHandshake(ALICE, aeads=(AEAD_AES256GCM, AEAD_CHACHA20POLY1305))
    r = ResponderHandshake(BOB, aeads=(AEAD_AES256GCM, AEAD_CHACHA20POLY1305))
    reply = msgpack.unpackb(r.receive_hello(i.start()))
    forged = list(reply)
    forged[3] = AEAD_CHACHA20POLY1305  # choice alone: breaks the offer rule
    i2 = InitiatorHandshake(ALICE, aeads=(AEAD_AES256GCM, AEAD_CHACHA20POLY1305))
    i2.start()
    with pytest.raises(HandshakeError, match="peer chose frame AEAD 'chacha20poly1305'"):
        i2.receive(msgpack.packb(forged))
    forged[4] = [AEAD_CHACHA20POLY1305]  # choice and the responder's list: breaks T2
    with pytest.raises(HandshakeError, match="failed to decrypt"):
        i.receive(msgpack.packb(forged))


# --- older peers ------------------------------------------------------------------------

V1_HELLO = packb(["hs1", 1, PROTOCOL_NAME, [1], bytes(32), bytes(32)])


def test_version_1_hello_gets_a_clear_version_error() -> None:
    with pytest.raises(HandshakeError, match="peer speaks protocol v1, this node v2"):
        ResponderHandshake(BOB).receive_hello(V1_HELLO)


def test_version_1_refusal_of_our_hello_is_a_clear_version_error() -> None:
    """What a version-1 responder sends back for our version-2 hello."""
    i = InitiatorHandshake(ALICE)
    i.start()
    abort = ResponderHandshake.abort_message(
        "malformed handshake message: hs1: unsupported version 2")
    with pytest.raises(HandshakeError, match="peer speaks protocol v1, this node v2"):
        i.receive(abort)


# --- key update -------------------------------------------------------------------------


def small_limits(monkeypatch: pytest.MonkeyPatch, frames: int, octets: int) -> None:
    monkeypatch.setattr(secure, "KEY_UPDATE_FRAMES", frames)
    monkeypatch.setattr(secure, "KEY_UPDATE_BYTES", octets)


@pytest.mark.parametrize("aead", KNOWN_AEADS)
def test_long_exchange_crosses_many_key_updates(monkeypatch: pytest.MonkeyPatch,
                                                aead: str) -> None:
    small_limits(monkeypatch, frames=7, octets=1000)
    si, sr, _ = handshake(aeads=(aead,))
    for n in range(600):
        msg = bytes([n % 256]) * (n % 300)
        assert sr.open(si.seal(msg)) == msg
        if n % 3 == 0:
            frame = bytearray(sr.seal(msg))
            assert si.open_in_place(frame) == msg
    # by frame count (600/7 ~ 86) and by bytes (~90 KB / 1000 B)
    assert si.send_epoch == sr.recv_epoch > 100
    assert sr.send_epoch == si.recv_epoch > 20


def test_key_update_follows_the_documented_ratchet(monkeypatch: pytest.MonkeyPatch) -> None:
    small_limits(monkeypatch, frames=2, octets=10**9)
    si, _, _ = handshake(aeads=(AEAD_AES256GCM,))
    secret0 = si._send.secret
    f = [si.seal(b"m%d" % n) for n in range(5)]
    secret1 = _expand_label(secret0, b"traffic upd", 32)
    secret2 = _expand_label(secret1, b"traffic upd", 32)
    assert f[0] == _frame(AEAD_AES256GCM, secret0, 0, b"m0")
    assert f[1] == _frame(AEAD_AES256GCM, secret0, 1, b"m1")
    assert f[2] == _frame(AEAD_AES256GCM, secret1, 0, b"m2")  # counter restarts per key
    assert f[3] == _frame(AEAD_AES256GCM, secret1, 1, b"m3")
    assert f[4] == _frame(AEAD_AES256GCM, secret2, 0, b"m4")


def test_byte_limit_alone_triggers_a_key_update(monkeypatch: pytest.MonkeyPatch) -> None:
    small_limits(monkeypatch, frames=10**6, octets=100)
    si, sr, _ = handshake()
    sr.open(si.seal(b"x" * 99))
    assert si.send_epoch == 0
    sr.open(si.seal(b"x"))
    assert si.send_epoch == sr.recv_epoch == 1
    assert sr.open(si.seal(b"after")) == b"after"


def test_default_limits_are_2_30_bytes_and_2_20_frames() -> None:
    assert (secure.KEY_UPDATE_BYTES, secure.KEY_UPDATE_FRAMES) == (2**30, 2**20)


@pytest.mark.parametrize("aead", KNOWN_AEADS)
def test_frame_replayed_from_before_a_key_update_is_rejected(
        monkeypatch: pytest.MonkeyPatch, aead: str) -> None:
    small_limits(monkeypatch, frames=4, octets=10**9)
    si, sr, _ = handshake(aeads=(aead,))
    frames = [si.seal(b"frame %d" % n) for n in range(6)]
    for f in frames[:5]:
        sr.open(f)
    assert sr.recv_epoch == 1
    # frame 0 of epoch 0 replayed at the position of frame 0 of epoch 1 ... and later
    with pytest.raises(ProtocolError, match="failed authentication"):
        sr.open(frames[0])
    assert sr.state is SessionState.DEAD


def test_replay_of_the_same_counter_from_an_older_epoch_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters restart per key: frame 1 of epoch 0 is not frame 1 of epoch 1."""
    small_limits(monkeypatch, frames=2, octets=10**9)
    si, sr, _ = handshake()
    f = [si.seal(b"same size") for _ in range(4)]
    sr.open(f[0])
    sr.open(f[1])
    sr.open(f[2])  # epoch 1, counter 0
    with pytest.raises(ProtocolError, match="failed authentication"):
        sr.open_in_place(bytearray(f[1]))  # epoch 0, counter 1 where epoch 1 counter 1 is due


# --- channel binding (QUIC) -------------------------------------------------------------

BINDING = bytes(range(32))


def test_bound_sessions_do_not_encrypt_frames_a_second_time() -> None:
    si, sr, _ = handshake(channel_binding=BINDING, responder_binding=BINDING)
    assert not si.frames_encrypted and not sr.frames_encrypted
    assert si.overhead_bytes == 0 and "QUIC" in si.protection
    assert si.seal(b"clear") == b"clear" and sr.open(b"clear") == b"clear"
    out = bytearray(10)
    assert si.seal_into(b"abc", out, 2) == 3 and out[2:5] == b"abc"
    frame = bytearray(b"in place")
    assert sr.open_in_place(frame) is frame


def test_bound_and_unbound_transcripts_differ() -> None:
    plain, _, _ = handshake()
    bound_, _, _ = handshake(channel_binding=BINDING, responder_binding=BINDING)
    assert plain.frames_encrypted and plain.transcript_hash != bound_.transcript_hash


@pytest.mark.parametrize(("mine", "theirs"), [
    (BINDING, bytes(reversed(BINDING))),  # relayed onto another QUIC connection
    (BINDING, b""),  # one side bound, the other not
    (b"", BINDING),
])
def test_handshake_with_another_connections_binding_fails(mine: bytes, theirs: bytes) -> None:
    with pytest.raises(HandshakeError, match="relayed from another connection"):
        handshake(channel_binding=mine, responder_binding=theirs)


def test_binding_of_the_wrong_length_is_a_local_error() -> None:
    with pytest.raises(ValueError, match="channel binding"):
        InitiatorHandshake(ALICE, channel_binding=b"short")
