"""The pure transfer machines (node/transfer/machine.py), paired in memory: no sockets,
no threads, no sleeping. Time is a number the test moves; the "disk" is a dict."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import IntegrityError, PeerUnreachable, ProtocolError, RemoteError
from node.transfer.machine import (
    IDLE_TIMEOUT_S,
    KEEPALIVE_INTERVAL_S,
    MAX_CHUNK_FAILURES,
    MAX_PENDING_WRITES,
    REQUEST_BATCH_BYTES,
    WINDOW_BYTES,
    CommitFiles,
    IllegalTransition,
    PlanFile,
    PlanOutcome,
    ReadChunk,
    Resolve,
    SendMessage,
    SinkFileState,
    SinkMachine,
    SourceFileState,
    SourceMachine,
    TransferPhase,
    WriteChunk,
)
from node.transfer.manifest import FileEntry, hash_chunk, root_hash
from node.transfer.protocol import (
    Abort,
    ChunkData,
    ChunkRequest,
    Complete,
    FetchManyRequest,
    FetchRequest,
    FileStatus,
    Keepalive,
    decode,
    parse_chunk_data,
)
from node.wire import Message

CHUNK = 64 << 10  # the smallest chunk a manifest may use: small, fast tests
TID = b"t" * 16


def entry(path: str, data: bytes, chunk_size: int = CHUNK) -> FileEntry:
    hashes = b"".join(hash_chunk(data[i:i + chunk_size])
                      for i in range(0, len(data), chunk_size))
    return FileEntry(path, len(data), 0o644, 1, chunk_size, hashes, root_hash(hashes, len(data)))


def wire(msg: Message, expect: tuple[type[Message], ...]) -> Any:
    """What the peer's driver would decode: encode, then the fast chunk path or the codec."""
    raw = msg.encode()
    view = parse_chunk_data(raw)
    return view if view is not None else decode(raw, expect)


class Pair:
    """A source and a sink machine joined by two message queues, with a fake disk.

    ``plan(index) -> (outcome, missing)`` answers PlanFile (default: need every chunk);
    ``corrupt(index, chunk, attempt) -> bool`` makes a write fail verification; writes
    are held back (``hold_writes``) to test the sink's backpressure.
    """

    def __init__(self, files: dict[str, bytes], *, inline: bool = False,
                 sink: SinkMachine | None = None, source: SourceMachine | None = None) -> None:
        self.data = list(files.values())
        self.entries = [entry(p, d) for p, d in files.items()]
        self.now = 0.0
        self.source = source or SourceMachine(TID, peer="alice")
        self.sink = sink or SinkMachine(peer="bob")
        self.to_sink: list[Any] = []
        self.to_source: list[Any] = []
        self.disk: dict[int, bytearray] = {}
        self.committed: list[int] = []
        self.plan: Callable[[int], tuple[PlanOutcome, list[int]]] = (
            lambda i: (PlanOutcome.NEED, list(range(self.entries[i].chunks))))
        self.corrupt: Callable[[int, int], bool] = lambda i, c: False
        self.hold_writes = False
        self.held: list[WriteChunk] = []
        self.reads: list[ReadChunk] = []
        self.requests_seen: list[tuple[int, int]] = []
        self._inline = inline

    def start(self) -> None:
        self.sink.start(self.now)
        if self.source.phase is TransferPhase.PREPARING:
            self.source.offer(self.entries, self.now, inline=self._inline)

    # -- one side's events ------------------------------------------------------
    def drain_source(self) -> None:
        while (ev := self.source.next_event()) is not None:
            if isinstance(ev, SendMessage):
                self.to_sink.append(wire(ev.message, SinkMachine.expect))
            elif isinstance(ev, ReadChunk):
                self.reads.append(ev)
                e = self.entries[ev.index]
                payload = self.data[ev.index][ev.chunk * e.chunk_size:][:e.chunk_len(ev.chunk)]
                self.to_sink.append(wire(ChunkData(ev.index, ev.chunk, payload),
                                         SinkMachine.expect))
                self.source.chunk_sent(ev.index, ev.chunk, self.now)
            elif isinstance(ev, Resolve):
                self.source.offer(self.entries, self.now)
            else:
                raise AssertionError(ev)

    def drain_sink(self) -> None:
        while (ev := self.sink.next_event()) is not None:
            if isinstance(ev, SendMessage):
                if isinstance(ev.message, ChunkRequest):
                    self.requests_seen.append((ev.message.index, ev.message.chunk))
                self.to_source.append(wire(ev.message, SourceMachine.expect))
            elif isinstance(ev, PlanFile):
                outcome, missing = self.plan(ev.index)
                self.disk.setdefault(ev.index, bytearray(self.entries[ev.index].size))
                self.sink.file_planned(ev.index, outcome, self.now, missing=missing,
                                       reason="blocked" if outcome is PlanOutcome.REFUSED
                                       else "")
            elif isinstance(ev, WriteChunk):
                if self.hold_writes:
                    self.held.append(ev)
                else:
                    self.write(ev)
            elif isinstance(ev, CommitFiles):
                self.committed.extend(ev.indices)
                self.sink.files_committed([(i, _final(i), "") for i in ev.indices], self.now)
            else:
                raise AssertionError(ev)

    def write(self, ev: WriteChunk) -> None:
        e = self.entries[ev.index]
        ok = (not self.corrupt(ev.index, ev.chunk)
              and hash_chunk(ev.data) == e.chunk_hash(ev.chunk))
        if ok:
            at = ev.chunk * e.chunk_size
            self.disk[ev.index][at:at + len(ev.data)] = ev.data
        self.sink.chunk_written(ev.index, ev.chunk, ok, self.now)

    # -- the wire ---------------------------------------------------------------
    def step(self, *, reorder: bool = False, lose_to_sink: bool = False) -> bool:
        """Deliver everything queued (optionally in reverse, or dropped); False when idle."""
        self.drain_source()
        self.drain_sink()
        moved = bool(self.to_sink or self.to_source)
        batch, self.to_sink = self.to_sink, []
        if reorder:
            batch.reverse()
        if not lose_to_sink:
            for msg in batch:
                if self.sink.wants_input():
                    self.sink.receive(msg, self.now)
                else:
                    self.to_sink.append(msg)  # the driver reads nothing meanwhile
                self.drain_sink()
        batch, self.to_source = self.to_source, []
        for msg in batch:
            self.source.receive(msg, self.now)
            self.drain_source()
        return moved

    def run(self, **kw: Any) -> None:
        self.start()
        for _ in range(10_000):
            if not self.step(**kw) and (self.source.finished or self.sink.finished):
                return
        raise AssertionError("the pair never settled")


def _final(index: int) -> Any:
    from pathlib import Path
    return Path(f"/received/f{index}")


def files(*sizes: int) -> dict[str, bytes]:
    return {f"d/f{i}.bin": os.urandom(n) for i, n in enumerate(sizes)}


# ---------------------------------------------------------------------------


def test_a_transfer_completes_and_every_byte_lands() -> None:
    f = files(5 * CHUNK + 100, 3, 0, 2 * CHUNK)
    p = Pair(f)
    p.run()
    assert p.source.phase is TransferPhase.DONE and p.sink.phase is TransferPhase.DONE
    assert [bytes(p.disk[i]) for i in range(4)] == list(f.values())
    assert p.sink.files == [SinkFileState.DONE] * 4
    assert p.source.files == [SourceFileState.SENT] * 4
    assert p.sink.bytes_done == p.sink.bytes_total == sum(map(len, f.values()))
    assert p.source.bytes_done == p.source.bytes_total
    assert sorted(p.committed) == [0, 1, 2, 3]
    assert len(p.source.outcomes()) == 4


def test_reordered_chunk_replies_are_accepted() -> None:
    f = files(9 * CHUNK + 1)
    p = Pair(f)
    p.run(reorder=True)
    assert p.sink.phase is TransferPhase.DONE
    assert bytes(p.disk[0]) == f["d/f0.bin"]


def test_the_window_bounds_bytes_in_flight() -> None:
    size = WINDOW_BYTES * 2 + 5
    p = Pair({"big": b"\0" * 0})
    p.entries = [entry("big", bytes(size), chunk_size=1 << 20)]
    p.start()
    p.drain_source()
    for msg in p.to_sink:
        p.sink.receive(msg, 0.0)
    p.drain_sink()
    assert len(p.requests_seen) == WINDOW_BYTES // (1 << 20)


def test_the_window_is_topped_up_a_batch_at_a_time() -> None:
    """Once the window is full, single arrivals ask for nothing; a batch's worth of free
    window asks for that batch at once (fewer, grouped request frames)."""
    mib = 1 << 20
    per_batch = REQUEST_BATCH_BYTES // mib
    p = Pair({"big": b""})
    p.entries = [entry("big", bytes(WINDOW_BYTES * 2), chunk_size=mib)]
    p.start()
    p.drain_source()
    p.sink.receive(p.to_sink.pop(0), 0.0)  # the offer
    p.drain_sink()
    assert len(p.requests_seen) == WINDOW_BYTES // mib
    p.to_source.clear()
    payload = bytes(mib)
    for n in range(per_batch):
        p.sink.receive(wire(ChunkData(0, n, payload), SinkMachine.expect), 0.0)
        p.drain_sink()
        asked = [m for m in p.to_source if isinstance(m, ChunkRequest)]
        if n < per_batch - 1:
            assert asked == [], f"asked after {n + 1} chunk(s) came back"
    assert [(m.index, m.chunk) for m in asked] == [
        (0, WINDOW_BYTES // mib + i) for i in range(per_batch)]


def test_resume_asks_only_for_the_missing_chunks() -> None:
    f = files(6 * CHUNK)
    p = Pair(f)
    p.plan = lambda i: (PlanOutcome.NEED, [2, 4])
    p.start()
    p.drain_source()
    p.sink.receive(p.to_sink.pop(0), 0.0)
    p.drain_sink()
    status = [m for m in p.to_source if isinstance(m, FileStatus)]
    assert status[0].missing == 2
    assert p.requests_seen == [(0, 2), (0, 4)]
    assert p.sink.bytes_done == 4 * CHUNK  # resumed chunks count as done at once
    p.to_sink.clear()
    while p.step():
        pass
    assert p.sink.phase is TransferPhase.DONE and p.source.phase is TransferPhase.DONE
    assert p.source.bytes_done == 6 * CHUNK


def test_a_file_the_sink_has_or_refuses_costs_no_chunk() -> None:
    f = files(3 * CHUNK, 2 * CHUNK)
    p = Pair(f)
    p.plan = lambda i: (PlanOutcome.HAVE if i == 0 else PlanOutcome.REFUSED, [])
    p.run()
    assert p.requests_seen == []
    assert p.sink.files == [SinkFileState.HAVE, SinkFileState.REFUSED]
    assert p.source.files == [SourceFileState.HAVE, SourceFileState.REFUSED]
    assert p.source.failures == [("d/f1.bin", "blocked")]
    assert p.sink.phase is TransferPhase.DONE


def test_a_bad_chunk_is_fetched_again_and_checked_by_the_source() -> None:
    f = files(3 * CHUNK)
    p = Pair(f)
    bad = {(0, 1)}

    def corrupt_once(index: int, chunk: int) -> bool:
        if (index, chunk) in bad:
            bad.discard((index, chunk))
            return True
        return False
    p.corrupt = corrupt_once
    p.run()
    assert p.sink.phase is TransferPhase.DONE
    assert p.requests_seen.count((0, 1)) == 2
    again = [r for r in p.reads if (r.index, r.chunk) == (0, 1)]
    assert [r.verify for r in again] == [False, True]  # the repeat is hashed before it goes


def test_a_chunk_bad_every_time_ends_the_transfer() -> None:
    p = Pair(files(2 * CHUNK))
    p.corrupt = lambda i, c: c == 1
    with pytest.raises(IntegrityError, match=f"{MAX_CHUNK_FAILURES} times"):
        p.run()
    assert p.sink.phase is TransferPhase.FAILED


def test_the_writer_falling_behind_stops_reading_from_the_peer() -> None:
    p = Pair(files(8 * CHUNK))
    p.hold_writes = True
    p.start()
    for _ in range(5):
        p.step()
    assert len(p.held) == MAX_PENDING_WRITES
    assert not p.sink.wants_input()
    assert p.to_sink  # the rest waits on the wire, not in memory
    p.hold_writes = False
    while p.held:
        p.write(p.held.pop(0))
    while p.step():
        pass
    assert p.sink.phase is TransferPhase.DONE


def test_a_silent_peer_times_out_but_a_keepalive_resets_the_clock() -> None:
    p = Pair(files(4 * CHUNK))
    p.start()
    p.step()
    p.step(lose_to_sink=True)  # the channel loses everything from here on
    deadline = p.sink.get_timer()
    assert deadline == pytest.approx(IDLE_TIMEOUT_S)
    p.sink.receive(Keepalive("busy"), 30.0)  # ... but the peer is alive
    assert p.sink.get_timer() == pytest.approx(30.0 + IDLE_TIMEOUT_S)
    p.sink.handle_timer(30.0 + IDLE_TIMEOUT_S - 1)  # not yet
    with pytest.raises(PeerUnreachable):
        p.sink.handle_timer(30.0 + IDLE_TIMEOUT_S)
    assert p.sink.phase is TransferPhase.FAILED and p.sink.get_timer() is None


def test_a_source_busy_hashing_sends_keepalives_not_a_timeout() -> None:
    source = SourceMachine(TID, peer="alice")  # PREPARING until offer()
    assert source.get_timer() == KEEPALIVE_INTERVAL_S
    for t in (KEEPALIVE_INTERVAL_S, 2 * KEEPALIVE_INTERVAL_S, IDLE_TIMEOUT_S * 3):
        source.handle_timer(t)
        ev = source.next_event()
        assert isinstance(ev, SendMessage) and isinstance(ev.message, Keepalive)
    assert source.phase is TransferPhase.PREPARING


def test_chunk_not_asked_for_is_a_protocol_violation() -> None:
    p = Pair(files(2 * CHUNK))
    p.start()
    p.drain_source()
    p.sink.receive(p.to_sink.pop(0), 0.0)
    with pytest.raises(ProtocolError, match="not asked for"):
        p.sink.receive(wire(ChunkData(0, 1, b"x" * CHUNK), SinkMachine.expect), 0.0)
    assert p.sink.phase is TransferPhase.FAILED


def test_wrong_size_chunk_and_early_complete_are_refused() -> None:
    p = Pair(files(2 * CHUNK))
    p.start()
    p.step()
    with pytest.raises(ProtocolError, match="wrong size"):
        p.sink.receive(ChunkData(0, 1, b"short"), 0.0)
    q = Pair(files(CHUNK))
    q.start()
    with pytest.raises(ProtocolError, match="before every file"):
        q.source.receive(Complete(TID), 0.0)


def test_requests_beyond_the_file_or_for_a_file_not_needed_are_refused() -> None:
    p = Pair(files(2 * CHUNK))
    p.start()
    with pytest.raises(ProtocolError, match="not being sent"):
        p.source.receive(ChunkRequest(0, 0), 0.0)
    q = Pair(files(2 * CHUNK))
    q.start()
    q.source.receive(FileStatus(0, 0, 2, ""), 0.0)
    with pytest.raises(ProtocolError, match="beyond the end"):
        q.source.receive(ChunkRequest(0, 2), 0.0)


def test_an_abort_from_the_peer_is_a_remote_error_with_its_code() -> None:
    p = Pair(files(CHUNK))
    p.start()
    with pytest.raises(RemoteError) as info:
        p.sink.receive(Abort("Cancelled", "cancelled by the user"), 0.0)
    assert info.value.code == "Cancelled"  # type: ignore[attr-defined]
    assert p.sink.phase is TransferPhase.FAILED


def test_fetch_many_sends_small_files_inline_without_requests() -> None:
    f = files(100, 2000, 3 * CHUNK)
    request = FetchManyRequest(TID, tuple([p, None] for p in f))
    sink = SinkMachine(peer="bob", request=request)
    source = SourceMachine(peer="alice", serve_request=True)
    p = Pair(f, sink=sink, source=source)
    p.run()
    assert sink.phase is TransferPhase.DONE and source.phase is TransferPhase.DONE
    assert [bytes(p.disk[i]) for i in range(3)] == list(f.values())
    assert {i for i, _ in p.requests_seen} == {2}  # only the big one is asked for


def test_a_fetch_of_a_file_the_source_lacks_is_told_not_found() -> None:
    source = SourceMachine(peer="alice", serve_request=True)
    source.receive(FetchRequest(TID, "d/x.bin", None), 0.0)
    ev = source.next_event()
    assert isinstance(ev, Resolve) and ev.wanted == (("d/x.bin", None),)
    assert source.get_timer() == KEEPALIVE_INTERVAL_S  # busy hashing: keepalives due
    source.offer([], 1.0)
    ev = source.next_event()
    assert isinstance(ev, SendMessage) and isinstance(ev.message, Abort)
    assert ev.message.code == "NotFound"
    assert source.phase is TransferPhase.FAILED


def test_the_sink_refuses_an_offer_it_did_not_ask_for() -> None:
    f = files(10)
    sink = SinkMachine(peer="bob", request=FetchRequest(TID, "other.bin", None))
    p = Pair(f, sink=sink, source=SourceMachine(TID, peer="alice"))
    with pytest.raises(ProtocolError, match="another file"):
        p.run()
    assert sink.phase is TransferPhase.FAILED


def test_illegal_file_transitions_raise() -> None:
    p = Pair(files(CHUNK, CHUNK))
    p.start()
    p.step()
    with pytest.raises(IllegalTransition, match="not being planned"):
        p.sink.file_planned(1, PlanOutcome.NEED, 0.0)  # the driver's bug, not the peer's
    sink = SinkMachine(peer="bob")
    sink.files = [SinkFileState.DONE]
    with pytest.raises(IllegalTransition, match="illegal transition"):
        sink._set_file(0, SinkFileState.PLANNING)


# -- random schedules: whatever order the replies come in, whatever fails once -------

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 5 * CHUNK + 7), min_size=1, max_size=4),
       rng=st.randoms(use_true_random=False))
def test_any_reply_order_resume_and_single_failures_still_converge(
        sizes: list[int], rng: Any) -> None:
    content = random.Random(rng.randrange(1 << 32))  # bulk bytes: not drawn via hypothesis
    f = {f"d/f{i}.bin": content.randbytes(n) for i, n in enumerate(sizes)}
    p = Pair(f, inline=False)
    have = {i: {c for c in range(p.entries[i].chunks) if rng.random() < 0.3}
            for i in range(len(sizes))}
    p.plan = lambda i: (PlanOutcome.NEED, sorted(set(range(p.entries[i].chunks)) - have[i]))
    bad = {(i, c) for i in range(len(sizes)) for c in range(p.entries[i].chunks)
           if rng.random() < 0.2}

    def corrupt_once(index: int, chunk: int) -> bool:
        if (index, chunk) in bad:
            bad.discard((index, chunk))
            return True
        return False
    p.corrupt = corrupt_once
    p.hold_writes = True
    p.start()
    for _ in range(100_000):
        p.drain_source()
        p.drain_sink()
        if p.to_sink and rng.random() < 0.5:
            # chunk replies in any order; the offer stays first, as the channel keeps it
            first = p.to_sink[0]
            if hasattr(first, "chunk") and len(p.to_sink) > 1:
                k = rng.randrange(len(p.to_sink))
                if hasattr(p.to_sink[k], "chunk"):
                    p.to_sink[0], p.to_sink[k] = p.to_sink[k], p.to_sink[0]
        if p.held and (rng.random() < 0.5 or not p.sink.wants_input()):
            p.write(p.held.pop(rng.randrange(len(p.held))))  # writes finish in any order
        elif p.to_sink and p.sink.wants_input():
            p.sink.receive(p.to_sink.pop(0), p.now)
        elif p.to_source:
            p.source.receive(p.to_source.pop(0), p.now)
        elif p.held:
            p.write(p.held.pop(0))
        else:
            break
    assert p.sink.phase is TransferPhase.DONE and p.source.phase is TransferPhase.DONE
    for i, data in enumerate(f.values()):
        e = p.entries[i]
        got = bytes(p.disk[i])
        for c in range(e.chunks):  # chunks we "had" are not rewritten: compare the rest
            if c not in have[i]:
                assert got[c * e.chunk_size:][:e.chunk_len(c)] == \
                    data[c * e.chunk_size:][:e.chunk_len(c)]
    assert p.source.bytes_done == p.source.bytes_total
    assert p.sink.bytes_done == p.sink.bytes_total
    for i in range(len(sizes)):
        for c in have[i]:
            assert (i, c) not in p.requests_seen  # resume asks only for what is missing
