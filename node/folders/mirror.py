"""The --share mirror's rules: what a trusted peer's change event means for our copy.

A node's ``--share DIR`` folders are mirrored read-only into every trusted peer's
``<received dir>/<origin label>/<folder label>/<path>``, driven by the origin's
signed gossip ``ChangeEvent``s (node/gossip/events.py). Each copy has one
writer (its origin) and events are ordered by the origin's seq, so there are no
version vectors and no conflicts between devices here: that is the two-way
folders' protocol (model.py, planner.py). What is the same: nothing is ever
destroyed (what a change replaces or deletes goes to a versions folder, named
``NAME~YYYYMMDD-HHMMSS-NNNNNNNNN`` as the two-way folders name theirs) and
nothing is shown that does not match its announced BLAKE3.

The decisions, as pure functions (mirror_service.py does the I/O):

* ``screen``: our own events are SKIPPED; an event not newer (seq) than the
  last one applied for its path is STALE. The memory is per process: the seq
  order of the log makes replays after a restart converge to the newest state.
* content (created / modified / shared), ``content_step``: KEEP when the
  target already holds the announced hash, else FILL: copy it from a local file
  with that hash (our shared folders, what we received earlier), else fetch it
  from the origin; a file at the target goes to the versions folder first.
* deleted, ``delete_step``: VERSION our copy if we hold one, else ABSENT.
* moved, ``move_step``: RENAME our old copy when it holds the moved content
  (no transfer; a file at the new path is versioned first); REPLACE_OLD when it
  holds something else (it is versioned, the new path filled); FILL the new
  path when we have no old copy.
* ``check_content``: a fetched or copied file is shown only if its hash matches.
* batches, ``must_flush`` / ``fetch_groups``: consecutive content events are
  fetched together, one session per origin and folder; a deletion, a move, a
  second event for a path already pending, or a full batch first waits for the
  fetches queued before it, so the order of events per path is kept.
* serving, ``shared_target``: a peer may fetch ``<folder label>/<path>`` of one
  of our --share folders, nothing else.

Pure: imports node.gossip.events (the event type), node.identity,
node.notifications, node.pathrules and node.errors; no file system, no asyncio.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Container, Sequence
from collections.abc import Set as AbstractSet
from pathlib import PurePosixPath
from typing import TypeVar

from node.errors import IntegrityError, ProtocolError
from node.gossip.events import ChangeEvent
from node.identity import PeerId
from node.notifications import FileReceived, TransferFailed
from node.pathrules import VERSIONS_DIR_NAME, safe_relpath

# content events of one origin whose fetches go out as one batch (one transfer session)
MAX_FETCH_BATCH = 512
# the received dir's own index (path -> size, mtime, hash) of what the mirror holds
SYNC_INDEX_NAME = ".p2pfs-sync.p2pfs-index"
# `node share` of single files: announced so peers are told, but the push carries them
ONE_OFF_KIND = "shared"
NON_CONTENT_KINDS = ("deleted", "moved")

MirrorKey = tuple[bytes, str, str]  # (origin key, folder, path)
T = TypeVar("T")


class MirrorOutcome(enum.Enum):
    """What applying one event did (the value is what logs and notifications say)."""

    FETCHED = "fetched"
    COPIED = "copied"  # same content found locally: no transfer
    MOVED = "moved"
    VERSIONED = "versioned"  # a deletion: our copy went to the versions folder
    UNCHANGED = "unchanged"
    STALE = "stale"  # an older event than one already applied for this path
    SKIPPED = "skipped"  # our own event


class Step(enum.Enum):
    """What the local mirror must do for one event, given what it holds."""

    KEEP = "keep"  # the target already holds the announced content
    FILL = "fill"  # copy the content from a local file with its hash, else fetch it
    VERSION = "version"  # a deletion: our copy goes to the versions folder
    ABSENT = "absent"  # a deletion of a file we do not hold: nothing to do
    RENAME = "rename"  # a move of the content we hold: rename it, no transfer
    REPLACE_OLD = "replace_old"  # a move, but our old copy is other content: version it, fill


# -- which events act --------------------------------------------------------------
def event_key(event: ChangeEvent, path: str | None = None) -> MirrorKey:
    return (event.origin.key, event.folder, event.path if path is None else path)


def applied_keys(event: ChangeEvent) -> tuple[MirrorKey, ...]:
    """The paths an applied event settles: its own, and a move's old path too."""
    if event.kind == "moved":
        return (event_key(event), event_key(event, event.old_path))
    return (event_key(event),)


def is_content(event: ChangeEvent) -> bool:
    """created / modified / shared: the event announces content at its path."""
    return event.kind not in NON_CONTENT_KINDS


def is_one_off(event: ChangeEvent) -> bool:
    """A `node share` announcement: peers are only told, the push carries the file."""
    return event.kind == ONE_OFF_KIND


def screen(event: ChangeEvent, *, self_id: PeerId, last_seq: int) -> MirrorOutcome | None:
    """SKIPPED (our own event), STALE (not newer than the last applied for its path:
    ``last_seq``, 0 when none was), or None: apply it."""
    if event.origin == self_id:
        return MirrorOutcome.SKIPPED
    if last_seq >= event.seq:
        return MirrorOutcome.STALE
    return None


# -- what the local copy must do ----------------------------------------------------
def content_step(want: bytes, held: bytes | None) -> Step:
    """``held``: the hash of the regular file at the target, None when there is none."""
    return Step.KEEP if held == want else Step.FILL


def delete_step(held: bool) -> Step:
    return Step.VERSION if held else Step.ABSENT


def move_step(want: bytes, old_held: bytes | None) -> Step:
    """``old_held``: the hash of our copy at the event's old path (None: no copy)."""
    if old_held is None:
        return Step.FILL
    return Step.RENAME if old_held == want else Step.REPLACE_OLD


def check_content(event: ChangeEvent, digest: bytes) -> None:
    """Raise IntegrityError unless ``digest`` is what the event announced."""
    if digest != event.hash:
        raise IntegrityError(f"{event.path} from {event.origin.short} does not match the "
                             "hash its change event announced")


# -- batches -----------------------------------------------------------------------
def must_flush(event: ChangeEvent, pending: AbstractSet[MirrorKey], *, batching: bool,
               max_batch: int = MAX_FETCH_BATCH) -> bool:
    """Must the fetches queued so far finish before ``event`` is looked at?"""
    return (not batching or not is_content(event) or event_key(event) in pending
            or len(pending) >= max_batch)


def fetch_groups(items: Sequence[tuple[ChangeEvent, T]]
                 ) -> dict[tuple[PeerId, str], list[tuple[ChangeEvent, T]]]:
    """Pending fetches by (origin, folder), in order: one fetch session each."""
    groups: dict[tuple[PeerId, str], list[tuple[ChangeEvent, T]]] = {}
    for event, extra in items:
        groups.setdefault((event.origin, event.folder), []).append((event, extra))
    return groups


# -- paths -------------------------------------------------------------------------
def fetch_rel(folder: str, path: str) -> str:
    """What a fetch asks the origin for: ``<folder label>/<path>``."""
    return f"{folder}/{path}"


def mirror_rel(label: str, folder: str, path: str) -> PurePosixPath:
    """Our copy of ``path``, relative to the received dir (``path`` checked)."""
    return PurePosixPath(label, folder) / safe_relpath(path)


def version_stamp(now_s: float, now_ns: int) -> str:
    """``YYYYMMDD-HHMMSS-NNNNNNNNN`` (UTC; the nanoseconds keep two versions apart)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now_s)) + f"-{now_ns % 10**9:09d}"


def version_rel(label: str, folder: str, path: str, stamp: str) -> PurePosixPath:
    """Where a replaced or deleted copy goes, relative to the received dir:
    ``<label>/.p2pfs-versions/<folder>/<path>~<stamp>``."""
    rel = PurePosixPath(label, VERSIONS_DIR_NAME, folder, *safe_relpath(path).parts)
    return rel.with_name(f"{rel.name}~{stamp}")


def shared_target(labels: Container[str], rel: str
                  ) -> tuple[str, PurePosixPath] | None:
    """(folder label, path inside it) a peer's fetch of ``rel`` names, or None when it
    names none of our --share folders or is not a valid relative path."""
    try:
        relpath = safe_relpath(rel)
    except ProtocolError:
        return None
    if len(relpath.parts) < 2 or relpath.parts[0] not in labels:
        return None
    return relpath.parts[0], PurePosixPath(*relpath.parts[1:])


# -- what users are told -----------------------------------------------------------
def brings_content(outcome: MirrorOutcome) -> bool:
    """Did applying the event put new content in place (a ``file_received``)?"""
    return outcome in (MirrorOutcome.FETCHED, MirrorOutcome.COPIED)


def received_note(event: ChangeEvent, outcome: MirrorOutcome, saved_as: str
                  ) -> FileReceived | None:
    """The ``file_received`` notification for an applied event, if it brought content."""
    if not brings_content(outcome):
        return None
    return FileReceived(peer_id=str(event.origin), path=event.path, size=event.size,
                        hash=event.hash.hex(), saved_as=saved_as, folder=event.folder,
                        event_id=event.id.hex(), how=outcome.value)


def failed_note(event: ChangeEvent, error: str) -> TransferFailed:
    """The ``transfer_failed`` notification for an event that could not be applied."""
    return TransferFailed(peer_id=str(event.origin), direction="sync", error=error,
                          paths=(fetch_rel(event.folder, event.path),),
                          event_id=event.id.hex())
