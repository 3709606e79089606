"""ShareService's notifications are typed values that name what failed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from node.identity import Identity
from node.memory_channel import channel_pair
from node.notifications import TransferFailed, decode
from node.sharing import ShareService
from node.transfer.session import fetch_file
from node.transfer.store import ReceiveStore

A = Identity.generate("alice", seed=b"a" * 32)
B = Identity.generate("bob", seed=b"b" * 32)


class _Peering:
    def register(self, _service: str, _handler: Any) -> None: ...

    def on_revoke(self, _callback: Any) -> None: ...


async def test_a_failed_serve_names_the_requested_path(tmp_path: Path) -> None:
    notes: list[Any] = []
    svc = ShareService(_Peering(), tmp_path / "recv", notify=notes.append,  # type: ignore[arg-type]
                       label_for=lambda _p: "bob", resolve_shared=lambda _r, _h: None,
                       default_transport="tcp", targets=lambda: [])
    ours, theirs = channel_pair(A.peer_id, B.peer_id)
    await asyncio.wait_for(asyncio.gather(
        svc.handle_fetch(ours),
        fetch_file(theirs, "docs/missing.txt", None, ReceiveStore(tmp_path / "theirs")),
        return_exceptions=True), 10)
    (note,) = notes
    assert isinstance(note, TransferFailed)
    assert note.direction == "serve" and note.peer_id == str(B.peer_id)
    assert note.paths == ("docs/missing.txt",) and "no such file" in note.error
    assert decode(note.KIND, note.encode()) == note
    line = note.render({str(B.peer_id): "bob"})
    assert line == "serving docs/missing.txt with bob failed: no such file: docs/missing.txt"
