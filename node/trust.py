"""The trusted-peer store and peer-name resolution.

Trust is explicit: only peers in this store may open a channel to us, be
connected to by us, send us files or have their change events acted on.
The store is an SQLite file in the home dir; the daemon reads it on every
check, so `node trust` takes effect in a running node without a restart, and
it watches ``data_version`` so that `node untrust` (from any process) closes
the peer's open channels at once.

``resolve_peer`` turns what a person typed (a full peer id, any unique prefix
of one, or an alias) into a PeerId, with clear errors for unknown and
ambiguous names. Imports identity and errors only.
"""

from __future__ import annotations

import difflib
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.errors import IdentityError, UnknownPeer
from node.identity import (
    GROUP_LEN,
    PEER_ID_TEXT_LEN,
    PeerId,
    normalize_id_text,
    validate_name,
)
from node.statefiles import private_dir, private_file

TRUST_DB_NAME = "trust.db"
MIN_PREFIX_LEN = 4
# how a peer was added: `node trust PEER_ID` or a pairing code (`node invite`/`accept`)
ADDED_VIA = ("id", "invite")


@dataclass(frozen=True)
class TrustedPeer:
    peer_id: PeerId
    alias: str
    added_at: float
    added_via: str = "id"

    def to_json(self) -> dict[str, object]:
        return {
            "peer_id": str(self.peer_id),
            "alias": self.alias,
            "fingerprint": self.peer_id.fingerprint,
            "added_at": self.added_at,
            "added_via": self.added_via,
        }


class TrustStore:
    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        self._db = sqlite3.connect(str(private_file(path)), isolation_level=None,
                                   check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS trusted ("
            " peer_key BLOB PRIMARY KEY, alias TEXT NOT NULL DEFAULT '', added_at REAL NOT NULL)"
        )
        # additive migration: stores made before pairing existed were all filled by id
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(trusted)")}
        if "added_via" not in columns:
            try:
                self._db.execute(
                    "ALTER TABLE trusted ADD COLUMN added_via TEXT NOT NULL DEFAULT 'id'")
            except sqlite3.OperationalError:  # another process migrated it a moment ago
                pass

    @classmethod
    def in_home(cls, home: Path) -> TrustStore:
        return cls(home / TRUST_DB_NAME)

    def close(self) -> None:
        self._db.close()

    def trust(self, peer_id: PeerId, alias: str = "", *, added_via: str = "id") -> TrustedPeer:
        """Trust a peer (again: the alias changes, when and how it was first added stay)."""
        if added_via not in ADDED_VIA:
            raise ValueError(f"added_via must be one of {ADDED_VIA}")
        alias = validate_name(alias)
        if alias:
            if PeerId.looks_like_prefix(alias) and len(normalize_id_text(alias)) >= 52:
                raise IdentityError("an alias may not look like a peer id")
            clash = self._db.execute(
                "SELECT peer_key FROM trusted WHERE alias = ? AND peer_key != ?",
                (alias, peer_id.key),
            ).fetchone()
            if clash:
                raise IdentityError(f"alias {alias!r} already names {PeerId(clash[0])}")
        now = time.time()
        self._db.execute(
            "INSERT INTO trusted(peer_key, alias, added_at, added_via) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(peer_key) DO UPDATE SET alias = excluded.alias",
            (peer_id.key, alias, now, added_via),
        )
        found = self.get(peer_id)
        assert found is not None
        return found

    def data_version(self) -> int:
        """Changes when another connection (`node trust`/`untrust` in another process)
        commits to the store: a cheap way for the daemon to notice revocations."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def trusted_ids(self) -> set[PeerId]:
        return {PeerId(row[0]) for row in self._db.execute("SELECT peer_key FROM trusted")}

    def untrust(self, peer_id: PeerId) -> bool:
        cur = self._db.execute("DELETE FROM trusted WHERE peer_key = ?", (peer_id.key,))
        return cur.rowcount > 0

    def is_trusted(self, peer_id: PeerId) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM trusted WHERE peer_key = ?", (peer_id.key,)
        ).fetchone()
        return row is not None

    def get(self, peer_id: PeerId) -> TrustedPeer | None:
        row = self._db.execute(
            "SELECT peer_key, alias, added_at, added_via FROM trusted WHERE peer_key = ?",
            (peer_id.key,)
        ).fetchone()
        return TrustedPeer(PeerId(row[0]), row[1], row[2], row[3]) if row else None

    def all(self) -> list[TrustedPeer]:
        rows = self._db.execute(
            "SELECT peer_key, alias, added_at, added_via FROM trusted ORDER BY added_at"
        ).fetchall()
        return [TrustedPeer(PeerId(k), a, t, v) for k, a, t, v in rows]

    def alias_of(self, peer_id: PeerId) -> str:
        found = self.get(peer_id)
        return found.alias if found else ""


def resolve_peer(text: str, known: Iterable[tuple[PeerId, Iterable[str]]]) -> PeerId:
    """Resolve a full id, a unique prefix (>= 4 chars) or an alias/name among `known` peers.

    `known` yields (peer id, names) pairs, names being aliases or advertised names.
    A full-length id with a bad checksum says a character is mistyped; a text that
    matches nothing says so and suggests close aliases.
    """
    text = text.strip()
    if not text:
        raise UnknownPeer("no peer given")
    compact = normalize_id_text(text)
    if len(compact) == PEER_ID_TEXT_LEN:
        try:
            return PeerId.parse(text)
        except IdentityError as exc:
            raise UnknownPeer(str(exc)) from None
    merged: dict[PeerId, set[str]] = {}
    for pid, names in known:
        merged.setdefault(pid, set()).update(n for n in names if n)
    known_list = list(merged.items())
    by_alias = {pid for pid, names in known_list if text in names}
    if len(by_alias) == 1:
        return by_alias.pop()
    if len(by_alias) > 1:
        raise UnknownPeer(f"name {text!r} is ambiguous: {len(by_alias)} peers use it; "
                          "give a peer id prefix instead")
    matches: set[PeerId] = set()
    if PeerId.looks_like_prefix(text) and len(compact) >= MIN_PREFIX_LEN:
        matches = {pid for pid, _ in known_list if pid.compact.startswith(compact)}
    if len(matches) > 1:
        shown = ", ".join(sorted(p.short for p in matches))
        raise UnknownPeer(f"peer id prefix {text!r} is ambiguous ({shown}); type more of it")
    if matches:
        return matches.pop()
    if PeerId.looks_like_prefix(text) and len(compact) > PEER_ID_TEXT_LEN - GROUP_LEN:
        try:  # nearly a whole id: the length is what is wrong, say so
            PeerId.parse(text)
        except IdentityError as exc:
            raise UnknownPeer(str(exc)) from None
    raise UnknownPeer(no_match_message(text, [n for _pid, names in known_list for n in names]))


def no_match_message(text: str, names: Iterable[str]) -> str:
    """What to say when `text` names no known peer: close aliases, else how to name one."""
    close = difflib.get_close_matches(text, sorted(set(names)), n=3, cutoff=0.6)
    msg = f"no trusted peer or alias matches {text!r}"
    if close:
        return msg + "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return (msg + f"; give an alias, a peer id prefix (at least {MIN_PREFIX_LEN} characters) "
            "or the full peer id")
