"""The zero-copy ChunkData codec: same bytes as the generic codec, same bounds, no copies."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import ProtocolError
from node.transfer.manifest import MAX_CHUNK_SIZE_BYTES, MAX_CHUNKS_PER_FILE
from node.transfer.protocol import (
    MAX_CHUNK_HEADER_BYTES,
    MAX_FILES_PER_FETCH,
    MAX_FILES_PER_TRANSFER,
    TO_SINK,
    TO_SOURCE,
    ChunkData,
    ChunkRequest,
    FetchManyRequest,
    Keepalive,
    chunk_header,
    decode,
    parse_chunk_data,
)
from node.wire import packb

EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536]


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 1 << 20, MAX_CHUNK_SIZE_BYTES])
@pytest.mark.parametrize("index", [0, 127, 128, 65536, MAX_FILES_PER_TRANSFER])
def test_header_plus_payload_is_the_generic_encoding(size: int, index: int) -> None:
    data = os.urandom(size)
    chunk = min(index, MAX_CHUNKS_PER_FILE)
    header = chunk_header(index, chunk, size)
    assert len(header) <= MAX_CHUNK_HEADER_BYTES
    assert header + data == ChunkData(index, chunk, data).encode()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_FILES_PER_TRANSFER), st.integers(0, MAX_CHUNKS_PER_FILE),
       st.binary(max_size=3000))
def test_parse_agrees_with_generic_decode(index: int, chunk: int, data: bytes) -> None:
    frame = bytearray(ChunkData(index, chunk, data).encode())
    view = parse_chunk_data(frame)
    assert view is not None
    generic = decode(bytes(frame), TO_SINK)
    assert isinstance(generic, ChunkData)
    assert (view.index, view.chunk, bytes(view.data)) == (generic.index, generic.chunk,
                                                           generic.data)


def test_payload_is_a_view_into_the_frame_not_a_copy() -> None:
    frame = bytearray(ChunkData(3, 4, b"abcdef").encode())
    view = parse_chunk_data(frame)
    assert view is not None and view.data.obj is frame
    frame[-1] = ord("X")
    assert bytes(view.data) == b"abcdeX"


@pytest.mark.parametrize("msg", [ChunkRequest(1, 2), Keepalive("busy")])
def test_other_messages_go_to_the_generic_codec(msg: object) -> None:
    assert parse_chunk_data(msg.encode()) is None  # type: ignore[attr-defined]
    assert parse_chunk_data(b"") is None
    assert parse_chunk_data(b"\x95") is None


def test_payload_length_must_match_the_frame() -> None:
    good = ChunkData(0, 1, b"x" * 1000).encode()
    with pytest.raises(ProtocolError, match="disagrees"):
        parse_chunk_data(good + b"trailing")
    with pytest.raises(ProtocolError, match="disagrees"):
        parse_chunk_data(good[:-1])


def test_bounds_are_enforced_before_the_payload_is_used() -> None:
    too_big = MAX_CHUNK_SIZE_BYTES + 1
    head = chunk_header(0, 0, 0)[:-2] + b"\xc6" + too_big.to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="longer than"):
        parse_chunk_data(head)  # refused from the header alone, no payload needed
    bad_index = ChunkData(0, 0, b"").encode().replace(b"\x00\x00\xc4", b"\xce\x7f\xff\xff\xff"
                                                      b"\x00\xc4", 1)
    with pytest.raises(ProtocolError):
        parse_chunk_data(bad_index)
    with pytest.raises(ProtocolError):
        decode(bad_index, TO_SINK)  # the generic codec refuses it too
    with pytest.raises(ValueError):
        chunk_header(MAX_FILES_PER_TRANSFER + 1, 0, 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(EDGES))
def test_hostile_frames_only_ever_raise_protocol_error(junk: bytes, cut: int) -> None:
    prefix = ChunkData(1, 2, b"").encode()[:12]
    for frame in (junk, prefix + junk, prefix[: cut % 13] + junk):
        try:
            view = parse_chunk_data(frame)
        except ProtocolError:
            continue
        if view is not None:  # whatever it accepts, the generic codec accepts identically
            generic = decode(bytes(frame), TO_SINK)
            assert isinstance(generic, ChunkData) and generic.data == bytes(view.data)


# -- FetchManyRequest: a batch of files pulled in one session -----------------------


_TID = b"t" * 16


def _fetch_many(n: int = 3) -> FetchManyRequest:
    return FetchManyRequest(_TID, tuple([f"folder/f{i}.bin", None if i % 2 else bytes([i]) * 32]
                                        for i in range(n)))


def test_fetch_many_round_trips_and_lists_what_it_wants() -> None:
    msg = _fetch_many(5)
    got = decode(msg.encode(), TO_SOURCE)
    assert isinstance(got, FetchManyRequest)
    assert got.wanted() == [(f"folder/f{i}.bin", None if i % 2 else bytes([i]) * 32)
                            for i in range(5)]


@pytest.mark.parametrize("items, why", [
    ((), "names no file"),
    ((["a", None], ["a", None]), "twice"),
    ((["a", b"x" * 31],), "root hash"),
    ((["a"],), "each item"),
    (("a",), "each item"),
    (([b"a", None],), "bad path"),
    ((["", None],), "bad path"),
    ((["x" * 5000, None],), "bad path"),
    ((["a", 7],), "root hash"),
])
def test_fetch_many_refuses_bad_items(items: tuple[object, ...], why: str) -> None:
    raw = packb([FetchManyRequest.TYPE, FetchManyRequest.VERSION, _TID, list(items)])
    with pytest.raises(ProtocolError, match=why):
        decode(raw, TO_SOURCE)


def test_fetch_many_is_bounded_in_files_and_transfer_id() -> None:
    items = [[f"f{i}", None] for i in range(MAX_FILES_PER_FETCH + 1)]
    with pytest.raises(ProtocolError, match="longer than"):
        decode(packb([FetchManyRequest.TYPE, 1, _TID, items]), TO_SOURCE)
    assert decode(packb([FetchManyRequest.TYPE, 1, _TID, items[:-1]]), TO_SOURCE)
    with pytest.raises(ProtocolError, match="transfer id"):
        decode(packb([FetchManyRequest.TYPE, 1, b"short", items[:1]]), TO_SOURCE)
    with pytest.raises(ProtocolError, match="unsupported version"):
        decode(packb([FetchManyRequest.TYPE, 2, _TID, items[:1]]), TO_SOURCE)


def test_fetch_many_cut_at_every_offset_only_raises_protocol_error() -> None:
    raw = _fetch_many(4).encode()
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode(raw[:cut], TO_SOURCE)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_fetch_many_with_one_byte_changed_decodes_or_raises_protocol_error(
        at: int, value: int) -> None:
    raw = bytearray(_fetch_many(4).encode())
    raw[at % len(raw)] = value
    try:
        msg = decode(bytes(raw), TO_SOURCE)
    except ProtocolError:
        return
    if isinstance(msg, FetchManyRequest):  # whatever decodes obeys every bound
        wanted = msg.wanted()
        assert 0 < len(wanted) <= MAX_FILES_PER_FETCH
        assert len({p for p, _ in wanted}) == len(wanted)
        assert all(r is None or len(r) == 32 for _, r in wanted)
