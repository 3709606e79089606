from __future__ import annotations

from dataclasses import field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import ProtocolError
from node.wire import FrameDecoder, Message, bound, decode_message, frame, message, packb


@message("test-sample")
class Sample(Message):
    name: str = field(metadata=bound(max_len=8))
    count: int = field(metadata=bound(max_val=100))
    blob: bytes = field(metadata=bound(max_len=4))
    note: str | None = None


def test_round_trip() -> None:
    m = Sample("ab", 3, b"xy", None)
    assert decode_message(m.encode()) == m


@pytest.mark.parametrize(
    "fields",
    [
        ["toolongname", 1, b"", None],
        ["a", 101, b"", None],
        ["a", -1, b"", None],
        ["a", True, b"", None],
        ["a", 1, b"12345", None],
        ["a", 1, "text", None],
        ["a", 1, b""],
        [None, 1, b"", None],
    ],
)
def test_rejects_bad_fields(fields) -> None:
    with pytest.raises(ProtocolError):
        decode_message(packb(["test-sample", 1, *fields]))


def test_rejects_unknown_type_version_and_unexpected() -> None:
    with pytest.raises(ProtocolError, match="unknown message"):
        decode_message(packb(["nope", 1]))
    with pytest.raises(ProtocolError, match="version"):
        decode_message(packb(["test-sample", 2, "a", 1, b"", None]))


@given(st.binary(max_size=256))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        decode_message(data)
    except ProtocolError:
        pass


def test_frame_decoder_splits_and_bounds() -> None:
    dec = FrameDecoder(max_frame_bytes=10)
    stream = frame(b"abc") + frame(b"") + frame(b"0123456789")
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == [b"abc", b"", b"0123456789"]
    with pytest.raises(ProtocolError, match="11-byte frame"):
        dec.feed(b"\x00\x00\x00\x0b")
