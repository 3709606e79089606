"""What a trusted device may announce in a folder is bounded at decode: a name's length and
depth, a size, a change's bytes, a batch's count (node/folders/protocol.py, model.py). The
number of entries per device is capped by the driver (test_folder_engine.py)."""

from __future__ import annotations

import blake3
import pytest

from node.errors import ProtocolError
from node.folders.model import MAX_FILE_SIZE_BYTES, FileInfo, FileKind
from node.folders.protocol import (
    CHANGES_BATCH_MAX,
    MAX_CHANGE_BYTES,
    Changes,
    FolderChange,
)
from node.folders.vector import Vector, device_key
from node.identity import Identity
from node.pathrules import MAX_PATH_BYTES
from node.wire import decode_message, packb

A = Identity.generate("a", seed=b"a" * 32)
DEV = device_key(A.peer_id)


def info(name: str = "f.txt", size: int = 1) -> FileInfo:
    return FileInfo(name, FileKind.FILE, size, 1, 0o644, blake3.blake3(b"x").digest(), False,
                    Vector.of([(DEV, 1)]), b"", DEV)


def blob(i: FileInfo) -> bytes:
    """A change as a peer could send it: signed by hand, nothing checked on this side."""
    unsigned = FolderChange(A.peer_id, "docs", 1, 1, i)
    return packb([A.peer_id.key, "docs", 1, 1, i.to_wire(), A.sign(unsigned.signed_bytes())])


def test_a_valid_change_decodes_and_verifies() -> None:
    assert FolderChange.decode(blob(info())).verify().info == info()


@pytest.mark.parametrize("bad, words", [
    (info("d/" * 70 + "f"), "components"),  # deeper than MAX_PATH_PARTS (64)
    (info("x" * 256), "255"),  # one component too long
    (info(size=MAX_FILE_SIZE_BYTES + 1), "size out of range"),
])
def test_enormous_names_and_sizes_are_refused(bad: FileInfo, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        FolderChange.decode(blob(bad))


def test_a_long_path_is_refused_before_it_is_stored() -> None:
    name = "/".join(["y" * 200] * 30)  # 30 parts of 200 bytes: past MAX_PATH_BYTES
    assert len(name) > MAX_PATH_BYTES
    with pytest.raises(ProtocolError):
        FolderChange.decode(blob(info(name)))


def test_a_batch_is_bounded_in_count_and_in_each_change_s_bytes() -> None:
    ok = Changes("docs", A.peer_id.key, 1, 0, False, (blob(info()),))
    assert decode_message(ok.encode(), expect=(Changes,)) == ok
    too_many = Changes("docs", A.peer_id.key, 1, 0, False,
                       (blob(info()),) * (CHANGES_BATCH_MAX + 1))
    with pytest.raises(ProtocolError, match="longer than"):
        decode_message(too_many.encode(), expect=(Changes,))
    fat = Changes("docs", A.peer_id.key, 1, 0, False, (b"\x00" * (MAX_CHANGE_BYTES + 1),))
    with pytest.raises(ProtocolError, match="at most"):
        decode_message(fat.encode(), expect=(Changes,))


def test_hello_carries_a_bounded_label_per_folder() -> None:
    from node.folders.config import MAX_LABEL_LEN
    from node.folders.protocol import Hello

    hello = Hello(("docs", "photos"), ("", "Family photos"))
    got = decode_message(hello.encode(), expect=(Hello,))
    assert got == hello and got.label_of("photos") == "Family photos"
    assert got.label_of("docs") == "" and got.label_of("other") == ""
    assert decode_message(Hello(("docs",)).encode(), expect=(Hello,)).label_of("docs") == ""
    for bad, words in ((Hello(("docs",), ("a", "b")), "one label per folder"),
                       (Hello(("docs",), ("x" * (MAX_LABEL_LEN + 1),)), "at most")):
        with pytest.raises(ProtocolError, match=words):
            decode_message(bad.encode(), expect=(Hello,))
