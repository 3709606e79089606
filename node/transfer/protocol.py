"""Transfer wire messages (node.wire @message dataclasses, every field bounded).

The sink (receiver) drives a transfer over one channel:

    source -> sink   Offer(tid, seq, last, entries)...   manifest, maybe in several messages
    sink -> source   FetchRequest(tid, path, root)       (pull variant, sent first, by the sink)
    sink -> source   FetchManyRequest(tid, items)        (pull of a batch of files, one session;
                                                          the Offer lists those the source has;
                                                          small files then come inline: see
                                                          inline_indices)
    sink -> source   FileStatus(index, status, missing)  per file: need / have it / refused
    sink -> source   ChunkRequest(index, chunk)          a window of several in flight
    source -> sink   ChunkData(index, chunk, data)       only for a requested chunk
    sink -> source   FileDone(index, ok, reason)         per file, after the root check
    sink -> source   Complete(tid)                       all files handled
    either way       Keepalive(note)                     still busy locally (hashing)
    either way       Abort(code, reason)                 ends the transfer

Pure: no I/O. Must not import the channel, transports, session or daemon.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from node.errors import ProtocolError
from node.transfer.manifest import MAX_CHUNK_SIZE_BYTES, MAX_CHUNKS_PER_FILE, FileEntry
from node.transfer.paths import MAX_PATH_BYTES
from node.wire import Message, bound, decode_message, message

TRANSFER_ID_BYTES = 16
MAX_FILES_PER_OFFER = 4096
MAX_FILES_PER_TRANSFER = 100_000
MAX_OFFER_MESSAGES = 10_000
MAX_CHUNKS_PER_TRANSFER = 1 << 19  # 16 MiB of chunk hashes held by the sink
MAX_REASON_BYTES = 300
MAX_CODE_BYTES = 32
# files one FetchManyRequest may name (the sink pulls a bigger batch in several sessions)
MAX_FILES_PER_FETCH = 1024
# an Offer is closed (next message started) past this many hash bytes, well under one frame
OFFER_BATCH_HASH_BYTES = 4 << 20


class FileStatusCode(IntEnum):
    NEED = 0  # chunk requests follow
    HAVE = 1  # identical file already there: nothing to send
    REFUSED = 2  # the sink will not take this file (reason says why)


@message("xfer.offer")
class Offer(Message):
    transfer_id: bytes = field(metadata=bound(max_len=TRANSFER_ID_BYTES))
    seq: int = field(metadata=bound(max_val=MAX_OFFER_MESSAGES))
    last: bool
    entries: tuple[Any, ...] = field(metadata=bound(max_len=MAX_FILES_PER_OFFER))

    def validate(self) -> None:
        if len(self.transfer_id) != TRANSFER_ID_BYTES:
            raise ProtocolError("Offer: bad transfer id")
        object.__setattr__(self, "_files", [FileEntry.from_wire(e) for e in self.entries])

    def files(self) -> list[FileEntry]:
        cached = self.__dict__.get("_files")
        if cached is None:
            self.validate()
            cached = self.__dict__["_files"]
        return list(cached)


@message("xfer.fetch")
class FetchRequest(Message):
    transfer_id: bytes = field(metadata=bound(max_len=TRANSFER_ID_BYTES))
    path: str = field(metadata=bound(max_len=MAX_PATH_BYTES))
    root: bytes | None = field(metadata=bound(max_len=32))

    def validate(self) -> None:
        if len(self.transfer_id) != TRANSFER_ID_BYTES:
            raise ProtocolError("FetchRequest: bad transfer id")
        if self.root is not None and len(self.root) != 32:
            raise ProtocolError("FetchRequest: bad root hash")


@message("xfer.fetchmany")
class FetchManyRequest(Message):
    """Pull several announced files in one session: ``items`` are ``[path, root|None]``.

    An old peer that does not know this type answers Abort("ProtocolError", "unknown
    message type 'xfer.fetchmany'"); the sink then falls back to one FetchRequest per file.
    """

    transfer_id: bytes = field(metadata=bound(max_len=TRANSFER_ID_BYTES))
    items: tuple[Any, ...] = field(metadata=bound(max_len=MAX_FILES_PER_FETCH))

    def validate(self) -> None:
        if len(self.transfer_id) != TRANSFER_ID_BYTES:
            raise ProtocolError("FetchManyRequest: bad transfer id")
        if not self.items:
            raise ProtocolError("FetchManyRequest: names no file")
        seen: set[str] = set()
        wanted: list[tuple[str, bytes | None]] = []
        for item in self.items:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ProtocolError("FetchManyRequest: each item is [path, root]")
            path, root = item
            if (not isinstance(path, str) or not path
                    or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES):
                raise ProtocolError("FetchManyRequest: bad path")
            if root is not None and (not isinstance(root, bytes) or len(root) != 32):
                raise ProtocolError("FetchManyRequest: bad root hash")
            if path in seen:
                raise ProtocolError("FetchManyRequest: names a file twice")
            seen.add(path)
            wanted.append((path, root))
        object.__setattr__(self, "_wanted", wanted)

    def wanted(self) -> list[tuple[str, bytes | None]]:
        cached = self.__dict__.get("_wanted")
        if cached is None:
            self.validate()
            cached = self.__dict__["_wanted"]
        return list(cached)


@message("xfer.status")
class FileStatus(Message):
    index: int = field(metadata=bound(max_val=MAX_FILES_PER_TRANSFER))
    status: int = field(metadata=bound(max_val=max(FileStatusCode)))
    missing: int = field(metadata=bound(max_val=MAX_CHUNKS_PER_FILE))
    reason: str = field(metadata=bound(max_len=MAX_REASON_BYTES))


@message("xfer.req")
class ChunkRequest(Message):
    index: int = field(metadata=bound(max_val=MAX_FILES_PER_TRANSFER))
    chunk: int = field(metadata=bound(max_val=MAX_CHUNKS_PER_FILE))


@message("xfer.data")
class ChunkData(Message):
    index: int = field(metadata=bound(max_val=MAX_FILES_PER_TRANSFER))
    chunk: int = field(metadata=bound(max_val=MAX_CHUNKS_PER_FILE))
    data: bytes = field(metadata=bound(max_len=MAX_CHUNK_SIZE_BYTES))


@message("xfer.done")
class FileDone(Message):
    index: int = field(metadata=bound(max_val=MAX_FILES_PER_TRANSFER))
    ok: bool
    reason: str = field(metadata=bound(max_len=MAX_REASON_BYTES))


@message("xfer.complete")
class Complete(Message):
    transfer_id: bytes = field(metadata=bound(max_len=TRANSFER_ID_BYTES))


@message("xfer.wait")
class Keepalive(Message):
    """"Still working" (hashing a big file, re-checking a partial): resets the idle timeout."""

    note: str = field(metadata=bound(max_len=64))


@message("xfer.abort")
class Abort(Message):
    code: str = field(metadata=bound(max_len=MAX_CODE_BYTES))
    reason: str = field(metadata=bound(max_len=MAX_REASON_BYTES))


TO_SINK = (Offer, ChunkData, Keepalive, Abort)
TO_SOURCE = (FetchRequest, FetchManyRequest, FileStatus, ChunkRequest, FileDone, Complete,
             Keepalive, Abort)


def clip(text: str, limit: int = MAX_REASON_BYTES) -> str:
    """Cut `text` to `limit` UTF-8 bytes without splitting a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def decode(data: bytes, expect: tuple[type[Message], ...]) -> Message:
    return decode_message(data, expect=expect)


# ---------------------------------------------------------------------------
# ChunkData without copying its payload
#
# A ChunkData frame is msgpack ``[b"xfer.data", 1, index, chunk, <bin data>]``. The
# source builds it as a header followed by the chunk read straight from disk into
# the same buffer; the sink parses the header by hand and hands on a view of the
# payload inside the (decrypted, owned) frame, so the chunk is never copied. The
# bytes are exactly what ``ChunkData(...).encode()`` gives, so either side may use
# the generic codec; anything the fast parser does not recognise goes to it.

_CHUNK_TYPE = ChunkData.TYPE.encode()
_CHUNK_PREFIX = (bytes([0x95, 0xA0 | len(_CHUNK_TYPE)]) + _CHUNK_TYPE
                 + bytes([ChunkData.VERSION]))
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
MAX_CHUNK_HEADER_BYTES = len(_CHUNK_PREFIX) + 5 + 5 + 5


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A decoded ChunkData whose ``data`` is a view into the received frame (no copy)."""

    index: int
    chunk: int
    data: memoryview


def _pack_uint(n: int) -> bytes:
    if n < 0x80:
        return _U8.pack(n)
    if n <= 0xFF:
        return b"\xcc" + _U8.pack(n)
    if n <= 0xFFFF:
        return b"\xcd" + _U16.pack(n)
    return b"\xce" + _U32.pack(n)


def chunk_header(index: int, chunk: int, size: int) -> bytes:
    """The bytes of ``ChunkData(index, chunk, data).encode()`` up to its ``size`` data bytes."""
    if not (0 <= index <= MAX_FILES_PER_TRANSFER and 0 <= chunk <= MAX_CHUNKS_PER_FILE
            and 0 <= size <= MAX_CHUNK_SIZE_BYTES):
        raise ValueError("chunk header out of range")
    if size <= 0xFF:
        bin_header = b"\xc4" + _U8.pack(size)
    elif size <= 0xFFFF:
        bin_header = b"\xc5" + _U16.pack(size)
    else:
        bin_header = b"\xc6" + _U32.pack(size)
    return _CHUNK_PREFIX + _pack_uint(index) + _pack_uint(chunk) + bin_header


def _read_uint(buf: memoryview, at: int) -> tuple[int, int] | None:
    """A msgpack positive integer (fixint, uint8/16/32) at `at`: (value, next offset)."""
    if at >= len(buf):
        return None
    tag = buf[at]
    if tag < 0x80:
        return tag, at + 1
    for code, st in ((0xCC, _U8), (0xCD, _U16), (0xCE, _U32)):
        if tag == code and at + 1 + st.size <= len(buf):
            return st.unpack_from(buf, at + 1)[0], at + 1 + st.size
    return None


def parse_chunk_data(frame: bytes | bytearray | memoryview) -> ChunkView | None:
    """Fast path for a ChunkData frame: a view of its payload, checked against every bound.

    None when the frame is not laid out as this module encodes ChunkData (the
    caller then decodes it with the generic, equally strict codec); ProtocolError
    when it is a ChunkData header that breaks a bound or disagrees with the frame.
    """
    view = memoryview(frame)
    n = len(_CHUNK_PREFIX)
    if len(view) < n + 4 or view[:n] != _CHUNK_PREFIX:
        return None
    got = _read_uint(view, n)
    if got is None:
        return None
    index, at = got
    got = _read_uint(view, at)
    if got is None:
        return None
    chunk, at = got
    if at >= len(view):
        return None
    tag = view[at]
    sizes = {0xC4: _U8, 0xC5: _U16, 0xC6: _U32}
    st = sizes.get(tag)
    if st is None or at + 1 + st.size > len(view):
        return None
    size = st.unpack_from(view, at + 1)[0]
    at += 1 + st.size
    if index > MAX_FILES_PER_TRANSFER or chunk > MAX_CHUNKS_PER_FILE:
        raise ProtocolError("xfer.data: index or chunk out of range")
    if size > MAX_CHUNK_SIZE_BYTES:
        raise ProtocolError(f"xfer.data.data: longer than {MAX_CHUNK_SIZE_BYTES}")
    if at + size != len(view):
        raise ProtocolError("xfer.data: payload length disagrees with the frame")
    return ChunkView(index, chunk, view[at:])


INLINE_MAX_FILE_BYTES = 64 << 10  # a one-chunk file this small comes without a request
INLINE_MAX_BYTES_PER_SESSION = 8 << 20  # unrequested bytes a source may send in one session


def inline_indices(entries: list[FileEntry]) -> set[int]:
    """The files of a fetch-many session whose only chunk the source sends right after the
    offer, unrequested: one-chunk files up to INLINE_MAX_FILE_BYTES, in offer order, until
    INLINE_MAX_BYTES_PER_SESSION. Both sides compute it from the offer alone. The sink
    answers them with FileDone (or FileStatus HAVE / REFUSED, dropping the data); a chunk
    that fails verification is requested again with ChunkRequest as usual.
    """
    out: set[int] = set()
    budget = INLINE_MAX_BYTES_PER_SESSION
    for i, e in enumerate(entries):
        if e.chunks == 1 and 0 < e.size <= min(INLINE_MAX_FILE_BYTES, budget):
            out.add(i)
            budget -= e.size
    return out


def offer_batches(transfer_id: bytes, entries: list[FileEntry]) -> list[Offer]:
    """Split a manifest into Offers that each fit in one frame."""
    batches: list[list[FileEntry]] = [[]]
    hash_bytes = 0
    for e in entries:
        if batches[-1] and (len(batches[-1]) >= MAX_FILES_PER_OFFER
                            or hash_bytes + len(e.chunk_hashes) > OFFER_BATCH_HASH_BYTES):
            batches.append([])
            hash_bytes = 0
        batches[-1].append(e)
        hash_bytes += len(e.chunk_hashes)
    return [Offer(transfer_id, i, i == len(batches) - 1, tuple(e.to_wire() for e in b))
            for i, b in enumerate(batches)]
