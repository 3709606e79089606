"""What a folder is doing, as `node folder status`, the dashboard and the API show it.

``FolderHost`` is the seam between the folder engine (node/folders driver,
which implements it) and its front ends (control commands, CLI, dashboard,
which only call it). Pure data: imports config only.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from node.folders.config import FolderConfig

STATUS_NAMES_MAX = 100  # names listed in a status (the counts cover all of them)


class FolderState(enum.Enum):
    IDLE = "idle"
    SCANNING = "scanning"
    SYNCING = "syncing"
    PAUSED = "paused"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class FolderStatus:
    id: str
    state: FolderState
    local_files: int = 0
    local_bytes: int = 0
    global_files: int = 0
    global_bytes: int = 0
    need_files: int = 0
    need_bytes: int = 0
    conflicts: int = 0
    locally_changed: int = 0  # receive-only: local edits not sent out
    # the first STATUS_NAMES_MAX of them (send-only: the remote versions not applied)
    locally_changed_names: tuple[str, ...] = ()
    last_error: str = ""
    last_scan_unix: float = 0.0

    @property
    def completion_pct(self) -> float:
        """Share of the global bytes held in their global version (100 if none needed)."""
        if self.global_bytes <= 0:
            return 100.0 if self.need_files == 0 else 0.0
        done = max(0, self.global_bytes - self.need_bytes)
        return round(100.0 * done / self.global_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["locally_changed_names"] = list(self.locally_changed_names)
        d["completion_pct"] = self.completion_pct
        return d


class FolderHost(Protocol):
    """What the folder engine offers its front ends (implemented by the driver)."""

    async def config_changed(self) -> None:
        """folders.json changed (added, removed, paused, peers edited): apply it now."""

    def status(self, cfg: FolderConfig) -> FolderStatus: ...

    async def rescan(self, folder_id: str) -> None: ...

    async def override(self, folder_id: str) -> int:
        """send-only: push our versions over remote changes; returns files overridden."""

    async def revert(self, folder_id: str) -> int:
        """receive-only: restore the global version of local edits; returns files reverted."""
