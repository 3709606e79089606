"""`node folder ...`: shared folders, synced both ways with the peers listed for each.

Thin, as node/cli.py: with a running node every command goes through its control
socket (`folder_*` commands, node/folders/commands.py), so a change takes effect at
once. With no node running, `add`, `list`, `remove`, `pause` and `resume` edit
HOME/folders.json with the very same checks and say the change applies at the next
start; `rescan`, `status`, `override` and `revert` need a running node and say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from node.cli import (
    HomeOpt,
    JsonOpt,
    _call,
    _home,
    _NodeGroup,
    _print_json,
    _resolve_offline,
    _size,
    app,
    err,
    handle_errors,
    out,
)
from node.errors import NodeNotRunning, ProtocolError
from node.folders.config import (
    MODES_TEXT,
    STATUS_SOURCE_CONFIG,
    FolderConfigError,
    FolderStore,
)

if TYPE_CHECKING:
    from node.folders.commands import FolderContext

# the folder commands' own module (node.folders.commands, with the folder engine's disk
# and ignore code: ~0.13 s of imports) is imported inside the commands that need it, so
# it loads only when a `node folder` command runs, not for every `node` command

folder_app = typer.Typer(
    cls=_NodeGroup,
    name="folder",
    help="Folders synced both ways with chosen peers (each side adds the same --id).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="The folder id (`node folder list`).")]
NEXT_START = "no node is running: saved in {file}; it applies when the node starts"
NEEDS_NODE = "{what} needs a running node (start it with `node start`)"


def _offline_ctx(home: Path) -> FolderContext:
    """The checks a running node makes, from the home alone: peers resolve among the
    trusted ones (full id, alias or prefix), the received dir from the config."""
    from node.config import absolute_paths, load_settings
    from node.folders import commands
    from node.identity import load_identity
    from node.trust import TrustStore

    settings = absolute_paths(load_settings(home))
    try:
        self_id = load_identity(home).peer_id
    except Exception:  # noqa: BLE001 - no identity yet: nothing to compare against
        self_id = None

    def is_trusted(peer: Any) -> bool:
        store = TrustStore.in_home(home)
        try:
            return store.is_trusted(peer)
        finally:
            store.close()

    def label_for(peer: Any) -> str:
        store = TrustStore.in_home(home)
        try:
            return store.alias_of(peer) or peer.short
        finally:
            store.close()

    return commands.FolderContext(
        home=home.resolve(), received=settings.received_path, self_id=self_id,
        resolve=lambda text: _resolve_offline(home, text), is_trusted=is_trusted,
        label_for=label_for, share_roots=tuple(Path(d) for d in settings.shared_dirs))


def _offline_store(home: Path) -> FolderStore:
    from node.errors import ConfigError

    try:
        return FolderStore.load(home)
    except FolderConfigError as exc:
        raise ConfigError(str(exc)) from None


def _online(home: Path | None, cmd: str, args: dict[str, Any]) -> Any:
    """The node's answer, or NodeNotRunning; a node too old for folders says so."""
    try:
        return _call(home, cmd, args)
    except ProtocolError as exc:
        if "unknown control command" in str(exc):
            raise ProtocolError("the running node has no folder commands (an older "
                                "version); restart it with `node stop` and `node start`") \
                from None
        raise


def _need_node(home: Path | None, cmd: str, args: dict[str, Any], what: str) -> Any:
    try:
        return _online(home, cmd, args)
    except NodeNotRunning:
        raise NodeNotRunning(NEEDS_NODE.format(what=what)) from None


def _applied(row: dict[str, Any]) -> None:
    """Where the change stands: live, kept for the engine, or for the next start."""
    if row.get("offline"):
        err.print(NEXT_START.format(file=row["file"]), markup=False)
    elif not row.get("live", True):
        err.print("(this node runs no folder engine yet: the change is saved in "
                  "folders.json and applies once it does)", markup=False)


def _print_row_json_or(row: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        _print_json(row)
    else:
        out.print(text, markup=False)
    _applied(row)


# ---------------------------------------------------------------------------- commands


@folder_app.command("add")
@handle_errors
def add(
    path: Annotated[Path, typer.Argument(help="The folder on this machine (it must exist).")],
    folder_id: Annotated[str, typer.Option(
        "--id", help="Folder id, the same on every device (letters, digits, '.', '_', "
                     "'-'; up to 64).")],
    peer: Annotated[list[str] | None, typer.Option(
        "--peer", help="A trusted peer to sync it with: alias, id prefix or full id "
                       "(repeatable).")] = None,
    mode: Annotated[str, typer.Option(
        "--mode", help=f"One of: {MODES_TEXT}.")] = "send-receive",
    label: Annotated[str, typer.Option("--label", help="A name to show for it.")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a folder synced with the listed trusted peers.

    Nothing flows until each peer has added the same --id with this node as a peer.
    A running node starts at once; with none, folders.json is edited for the next start.

    Example: node folder add ~/Photos --id photos --peer bob --label "Family photos"
    """
    from node.folders import commands

    args = {"path": str(path.expanduser().absolute()), "id": folder_id, "peers": list(peer or []),
            "mode": mode, "label": label}
    try:
        row = _online(home, "folder_add", args)
    except NodeNotRunning:
        h = _home(home)
        store = _offline_store(h)
        ctx = _offline_ctx(h)
        cfg = commands.add_folder(store, ctx, args)
        row = {**commands.folder_row(cfg, ctx, None), "live": False, "offline": True,
               "file": str(store.file)}
    who = ", ".join(row.get("peer_labels") or []) or "no peers yet (add with --peer)"
    _print_row_json_or(row, as_json, f"added folder {row['id']} at {row['path']} "
                                     f"({row['mode']}), shared with {who}")


@folder_app.command("list")
@handle_errors
def list_folders(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List the folders, their mode, state and completion.

    Example: node folder list --json
    """
    from node.folders import commands

    try:
        rows = _online(home, "folder_list", {})
        offline = False
    except NodeNotRunning:
        h = _home(home)
        ctx = _offline_ctx(h)
        rows = [commands.folder_row(cfg, ctx, None) for cfg in _offline_store(h)]
        offline = True
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print("no folders; add one with `node folder add PATH --id ID --peer PEER`")
        return
    table = Table("id", "label", "path", "mode", "state", "done", "conflicts", "peers")
    for r in rows:
        st = r["status"]
        measured = st.get("source") != STATUS_SOURCE_CONFIG
        table.add_row(r["id"], r["label"] or "-", r["path"], r["mode"], st["state"],
                      f"{st['completion_pct']:.0f}%" if measured else "?",
                      str(st["conflicts"]) if measured else "?",
                      ", ".join(r.get("peer_labels") or []) or "-")
    out.print(table)
    if offline:
        err.print("no node is running: states are from folders.json only", markup=False)
    elif any(r["status"].get("source") == STATUS_SOURCE_CONFIG for r in rows):
        err.print("this node runs no folder engine yet: '?' is not known", markup=False)


@folder_app.command("remove")
@handle_errors
def remove(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stop syncing a folder. Its files stay where they are.

    Example: node folder remove photos
    """
    from node.folders import commands

    try:
        row = _online(home, "folder_remove", {"id": folder_id})
    except NodeNotRunning:
        store = _offline_store(_home(home))
        cfg = commands.remove_folder(store, folder_id)
        row = {**cfg.to_json(), "removed": True, "files_kept": True, "live": False,
               "offline": True, "file": str(store.file)}
    _print_row_json_or(row, as_json, f"removed folder {row['id']}; its files stay in "
                                     f"{row['path']}")


def _pause(folder_id: str, home: Path | None, as_json: bool, paused: bool) -> None:
    from node.folders import commands

    cmd = "folder_pause" if paused else "folder_resume"
    try:
        row = _online(home, cmd, {"id": folder_id})
    except NodeNotRunning:
        h = _home(home)
        store = _offline_store(h)
        cfg = commands.set_paused(store, folder_id, paused)
        row = {**commands.folder_row(cfg, _offline_ctx(h), None), "live": False, "offline": True,
               "file": str(store.file)}
    verb = "paused" if paused else "resumed"
    _print_row_json_or(row, as_json, f"{verb} folder {row['id']}")


@folder_app.command("pause")
@handle_errors
def pause(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stop syncing a folder for now (it stays paused across restarts until resumed).

    Example: node folder pause photos
    """
    _pause(folder_id, home, as_json, True)


@folder_app.command("resume")
@handle_errors
def resume(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Sync a paused folder again.

    Example: node folder resume photos
    """
    _pause(folder_id, home, as_json, False)


@folder_app.command("rescan")
@handle_errors
def rescan(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Scan a folder now for changes the watcher missed.

    A running node also rescans every folder hourly on its own.

    Example: node folder rescan photos
    """
    row = _need_node(home, "folder_rescan", {"id": folder_id}, "rescan")
    if as_json:
        _print_json(row)
        return
    out.print(f"rescanned folder {row['id']}: {row['status']['state']}", markup=False)


def status_lines(row: dict[str, Any]) -> list[str]:
    """`node folder status` for a person."""
    st = row["status"]
    title = f"folder {row['id']}" + (f" ({row['label']})" if row.get("label") else "")
    lines = [title, f"  path             {row['path']}", f"  mode             {row['mode']}",
             f"  state            {st['state']}",
             f"  peers            {', '.join(row.get('peer_labels') or []) or 'none'}"]
    if st.get("source") == STATUS_SOURCE_CONFIG:
        lines.append("  counts           not known: this node runs no folder engine yet")
        return lines
    lines += [
        f"  completion       {st['completion_pct']:.1f} %",
        f"  local            {st['local_files']} files, {_size(st['local_bytes'])}",
        f"  global           {st['global_files']} files, {_size(st['global_bytes'])}",
        f"  need             {st['need_files']} files, {_size(st['need_bytes'])}",
        f"  conflicts        {st['conflicts']}",
        f"  locally changed  {st['locally_changed']}" + _names(st),
        f"  last error       {st['last_error'] or '-'}",
    ]
    return lines


def _names(st: dict[str, Any], shown: int = 5) -> str:
    # names come from the disk and from peers: control characters are shown as '?'
    names = ["".join("?" if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in str(n))
             for n in st.get("locally_changed_names") or []]
    if not names:
        return ""
    more = st["locally_changed"] - min(shown, len(names))
    return f" ({', '.join(names[:shown])}{f' and {more} more' if more > 0 else ''})"


@folder_app.command("status")
@handle_errors
def status(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show what a folder is doing: state, completion, files needed, conflicts.

    State is idle, scanning, syncing, paused or error; also shown: local and global
    files and bytes, files still needed, conflicts, local edits, the last error.

    Example: node folder status photos --json
    """
    row = _need_node(home, "folder_status", {"id": folder_id}, "folder status")
    if as_json:
        _print_json(row)
        return
    for line in status_lines(row):
        out.print(line, markup=False)


@folder_app.command("override")
@handle_errors
def override(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Push this node's versions over changes made elsewhere (send-only folders).

    Example: node folder override website
    """
    row = _need_node(home, "folder_override", {"id": folder_id}, "override")
    if as_json:
        _print_json(row)
        return
    out.print(f"folder {row['id']}: {row['overridden']} file(s) overridden with this "
              "node's version", markup=False)


@folder_app.command("revert")
@handle_errors
def revert(folder_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Undo local edits, restoring the version the peers have (receive-only folders).

    Example: node folder revert backups
    """
    row = _need_node(home, "folder_revert", {"id": folder_id}, "revert")
    if as_json:
        _print_json(row)
        return
    out.print(f"folder {row['id']}: {row['reverted']} file(s) restored to the global "
              "version", markup=False)


app.add_typer(folder_app, name="folder")
