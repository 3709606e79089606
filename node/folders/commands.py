"""The `folder_*` control commands: what `node folder ...` and the dashboard ask of a node.

Each command edits the node's ``FolderStore`` (folders.json), saves it, and tells the
folder engine (a ``FolderHost``) when one runs, so the change takes effect at once.
The same checks run with no daemon at all: the CLI builds a ``FolderContext`` from the
home and calls the ``*_folder`` functions below directly on a store it loaded, so a
folder refused by a running node is refused offline with the same words.

Without an engine (``engine()`` answers None), `folder_status` and `folder_list`
report what the configuration alone says: state ``paused`` or ``idle`` and
``"source": "config"``, so no front end shows zero counts as if they were measured;
`rescan`, `override` and `revert` need the engine and say so.

Imports errors, statefiles, identity and node/folders (config, status; disk only when a
folder is added), never the engine: a daemon with no folder loads it on first use (its
``start_folder_engine``, which ``register`` passes in). The daemon registers the
handlers (``register``), nothing here knows the daemon's other services.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ConfigError, LocalIOError, PeerNotTrusted, UnknownPeer
from node.folders.config import (
    MAX_FOLDER_PEERS,
    MAX_LABEL_LEN,
    MODES_TEXT,
    STATUS_SOURCE_CONFIG,
    FolderConfig,
    FolderConfigError,
    FolderMode,
    FolderStore,
    check_folder_id,
)
from node.folders.status import FolderHost, FolderState, FolderStatus
from node.identity import PeerId
from node.statefiles import check_shared_root

log = logging.getLogger("p2pfs.folders")

STATUS_SOURCE_ENGINE = "engine"  # counts measured by the running folder engine
MAX_PATH_CHARS = 4096
FOLDER_COMMANDS = ("folder_add", "folder_list", "folder_remove", "folder_pause",
                   "folder_resume", "folder_rescan", "folder_status", "folder_override",
                   "folder_revert")

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class FolderEngineMissing(ConfigError):
    """The command needs the folder engine, and this node runs none."""


@dataclass(frozen=True, slots=True)
class FolderContext:
    """What the folder commands need of the node around them."""

    home: Path
    received: Path
    self_id: PeerId | None
    resolve: Callable[[str], PeerId]  # alias / prefix / full id -> PeerId (UnknownPeer)
    is_trusted: Callable[[PeerId], bool]
    label_for: Callable[[PeerId], str]  # how a peer is shown: alias, else short id
    share_roots: tuple[Path, ...] = ()  # the one-way --share folders (absolute)


# ---------------------------------------------------------------------------- checks


def parse_mode(text: object) -> FolderMode:
    if text is None or text == "":
        return FolderMode.SEND_RECEIVE
    if isinstance(text, FolderMode):
        return text
    try:
        return FolderMode(str(text).strip().lower())
    except ValueError:
        raise ConfigError(f"unknown folder mode {text!r}; use one of: {MODES_TEXT}") from None


def check_label(text: object) -> str:
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ConfigError("a folder label must be text")
    label = text.strip()
    if len(label) > MAX_LABEL_LEN:
        raise ConfigError(f"a folder label has at most {MAX_LABEL_LEN} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise ConfigError("a folder label must not hold control characters")
    return label


def check_id(text: object) -> str:
    if not isinstance(text, str):
        raise ConfigError("give the folder id as text (--id ID)")
    try:
        return check_folder_id(text.strip())
    except FolderConfigError as exc:
        raise ConfigError(str(exc)) from None


def folder_path(text: object, ctx: FolderContext) -> Path:
    """An existing directory, made absolute and symlink-free, that holds none of the
    node's own state: not the home dir (nor inside it), not the received dir (nor
    inside it: the one-way mirror writes there)."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_PATH_CHARS:
        raise ConfigError("give the folder's path on this machine")
    given = Path(text.strip()).expanduser()
    if not given.is_absolute():
        raise ConfigError(f"{text} is not an absolute path on this machine")
    try:
        path = given.resolve(strict=True)
    except FileNotFoundError:
        raise ConfigError(f"{given} does not exist; create it first (mkdir -p {given})") \
            from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise LocalIOError(f"cannot use {given}: {exc}") from None
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder")
    received = ctx.received.resolve()
    if path == received or received in path.parents:
        raise ConfigError(f"folder {path} is this node's received dir {received} or inside "
                          "it, where files pushed by peers land; pick a folder outside it")
    check_shared_root(path, home=ctx.home, received=ctx.received, what="folder")
    for root in ctx.share_roots:
        root = root.resolve()
        if path == root or root in path.parents or path in root.parents:
            raise ConfigError(f"folder {path} overlaps the --share folder {root}, which is "
                              "shared one-way already; pick a folder outside it, or stop "
                              "sharing it with --share")
    return path


def folder_peers(texts: object, ctx: FolderContext) -> tuple[PeerId, ...]:
    """Each peer named by alias, unique prefix or full id, and trusted by this node."""
    if texts is None:
        return ()
    if isinstance(texts, str) or not isinstance(texts, list | tuple):
        raise ConfigError("peers must be a list of peer ids or aliases")
    if len(texts) > MAX_FOLDER_PEERS:
        raise ConfigError(f"a folder is shared with at most {MAX_FOLDER_PEERS} peers")
    out: list[PeerId] = []
    for text in texts:
        if not isinstance(text, str):
            raise UnknownPeer("a peer must be named by its id or alias")
        try:
            peer = ctx.resolve(text)
        except UnknownPeer as exc:
            raise UnknownPeer(f"{exc}; a folder is shared with trusted peers only: trust one "
                              "with `node trust PEER_ID --name NAME`") from None
        if ctx.self_id is not None and peer == ctx.self_id:
            raise UnknownPeer(f"{text!r} is this node itself; name the other devices")
        if not ctx.is_trusted(peer):
            raise PeerNotTrusted(
                f"peer {text!r} ({peer.short}) is not trusted, so no folder can be shared "
                f"with it; trust it first: node trust {peer} --name NAME (or pair with "
                "`node invite` / `node accept`)")
        if peer not in out:
            out.append(peer)
    return tuple(out)


def _config_error(fn: Callable[[], Any]) -> Any:
    """FolderStore speaks FolderConfigError (a ValueError); the node speaks ConfigError."""
    try:
        return fn()
    except FolderConfigError as exc:
        raise ConfigError(str(exc)) from None


def _require(store: FolderStore, folder_id: object) -> FolderConfig:
    fid = check_id(folder_id)
    cfg: FolderConfig = _config_error(lambda: store.require(fid))
    return cfg


def _save(store: FolderStore) -> None:
    """Save, or put the store back as the file has it and say why the disk refused."""
    try:
        store.save()
    except OSError as exc:
        try:
            store.reload()
        except (OSError, FolderConfigError):
            pass
        raise LocalIOError(f"cannot write {store.file}: {exc.strerror or exc}") from None


def _fresh(store: FolderStore) -> bool:
    """Start from what the file says (someone may have edited it); True if it was read
    again (whoever watches ``changed()`` then no longer sees it: tell the engine)."""
    if not store.changed():
        return False
    _config_error(store.reload)
    return True


# ---------------------------------------------------------------------------- edits
# Each returns the folder's row and leaves the store saved; the caller tells the engine.


def add_folder(store: FolderStore, ctx: FolderContext, args: dict[str, Any]) -> FolderConfig:
    _fresh(store)
    fid = check_id(args.get("id"))
    existing = store.get(fid)
    if existing is not None:
        raise ConfigError(f"a folder with id {fid!r} exists already (at {existing.path}); "
                          f"pick another id, or `node folder remove {fid}` first")
    cfg = FolderConfig(id=fid, path=folder_path(args.get("path"), ctx),
                       peers=folder_peers(args.get("peers"), ctx),
                       mode=parse_mode(args.get("mode")), label=check_label(args.get("label")))
    _config_error(lambda: store.put(cfg))  # refuses a folder overlapping another
    _save(store)
    from node.folders.disk import write_marker  # (ignore rules, pathspec: on first use only)

    try:  # "this is the folder": without it a non-empty index means an unmounted disk
        write_marker(cfg.path, cfg.id)
    except OSError as exc:
        log.warning("folder %s: cannot create its marker in %s (%s); the node makes it when "
                    "it first syncs the folder", cfg.id, cfg.path, exc)
    return cfg


def remove_folder(store: FolderStore, folder_id: object) -> FolderConfig:
    _fresh(store)
    cfg = _require(store, folder_id)
    store.remove(cfg.id)
    _save(store)
    return cfg


def set_paused(store: FolderStore, folder_id: object, paused: bool) -> FolderConfig:
    _fresh(store)
    cfg = _require(store, folder_id)
    if cfg.paused != paused:
        cfg = _config_error(lambda: store.update(cfg.id, paused=paused))
        _save(store)
    return cfg


def config_status(cfg: FolderConfig) -> FolderStatus:
    """What the configuration alone says (no engine): paused or idle, nothing counted."""
    return FolderStatus(id=cfg.id, state=FolderState.PAUSED if cfg.paused else FolderState.IDLE)


def folder_row(cfg: FolderConfig, ctx: FolderContext, engine: FolderHost | None) -> dict[str, Any]:
    """One folder as `node folder list --json` / `status --json` and the API show it:
    its configuration, `peer_labels` beside `peers`, and `status` with its `source`."""
    row = cfg.to_json()
    row["peer_labels"] = [ctx.label_for(p) for p in cfg.peers]
    if engine is not None:
        status = engine.status(cfg).to_json()
        status["source"] = STATUS_SOURCE_ENGINE
    else:
        status = config_status(cfg).to_json()
        status["source"] = STATUS_SOURCE_CONFIG
    row["status"] = status
    return row


# ---------------------------------------------------------------------------- handlers


class FolderCommands:
    """The control handlers, over a store and (when it runs) the folder engine."""

    def __init__(self, ctx: FolderContext, store: Callable[[], FolderStore],
                 engine: Callable[[], FolderHost | None],
                 start_engine: Callable[[], Awaitable[FolderHost | None]] | None = None
                 ) -> None:
        self.ctx = ctx
        self._store = store
        self._engine = engine
        self._start_engine = start_engine  # a lazily started engine: run it now

    def register(self, register: Callable[[str, Callable[..., Awaitable[Any]]], None]) -> None:
        for name in FOLDER_COMMANDS:
            register(name, getattr(self, f"_cmd_{name.removeprefix('folder_')}"))

    @property
    def store(self) -> FolderStore:
        return self._store()

    def engine(self) -> FolderHost | None:
        return self._engine()

    def _need_engine(self, what: str) -> FolderHost:
        engine = self.engine()
        if engine is None:
            raise FolderEngineMissing(
                f"this node runs no folder engine, so it cannot {what}; the folder "
                "settings are kept and apply once it does")
        return engine

    async def _changed(self) -> bool:
        """Tell the engine (if any); True when the change is live now."""
        engine = self.engine()
        if engine is None:
            if self._start_engine is None or not len(self.store):
                return False
            # it starts from the store as it is now: nothing more to tell it
            return await self._start_engine() is not None
        await engine.config_changed()
        return True

    async def _current(self) -> FolderStore:
        """The store as the file has it; a reload here is passed on to the engine."""
        store = self.store
        if _fresh(store):
            await self._changed()
        return store

    def _row(self, cfg: FolderConfig) -> dict[str, Any]:
        return folder_row(cfg, self.ctx, self.engine())

    async def _edited(self, cfg: FolderConfig) -> dict[str, Any]:
        live = await self._changed()
        return {**self._row(cfg), "live": live}

    async def _cmd_add(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cfg = add_folder(await self._current(), self.ctx, args)
        log.info("folder %s added at %s (%s, %d peer(s))", cfg.id, cfg.path, cfg.mode.value,
                 len(cfg.peers))
        return await self._edited(cfg)

    async def _cmd_list(self, args: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        return [self._row(cfg) for cfg in await self._current()]

    async def _cmd_remove(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cfg = remove_folder(await self._current(), args.get("id"))
        log.info("folder %s removed (its files at %s are kept)", cfg.id, cfg.path)
        live = await self._changed()
        return {**cfg.to_json(), "removed": True, "files_kept": True, "live": live}

    async def _cmd_pause(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._edited(set_paused(await self._current(), args.get("id"), True))

    async def _cmd_resume(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._edited(set_paused(await self._current(), args.get("id"), False))

    async def _cmd_status(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return self._row(_require(await self._current(), args.get("id")))

    async def _cmd_rescan(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cfg = _require(await self._current(), args.get("id"))
        if cfg.paused:
            raise ConfigError(f"folder {cfg.id} is paused; `node folder resume {cfg.id}` "
                              "first")
        await self._need_engine(f"rescan folder {cfg.id}").rescan(cfg.id)
        return self._row(cfg)

    async def _cmd_override(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cfg = _require(await self._current(), args.get("id"))
        _need_mode(cfg, FolderMode.SEND_ONLY, "override",
                   "pushes this node's versions over remote changes")
        n = await self._need_engine(f"override folder {cfg.id}").override(cfg.id)
        return {**self._row(cfg), "overridden": int(n)}

    async def _cmd_revert(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        cfg = _require(await self._current(), args.get("id"))
        _need_mode(cfg, FolderMode.RECEIVE_ONLY, "revert",
                   "restores the global version of local edits")
        n = await self._need_engine(f"revert folder {cfg.id}").revert(cfg.id)
        return {**self._row(cfg), "reverted": int(n)}


def _need_mode(cfg: FolderConfig, mode: FolderMode, verb: str, does: str) -> None:
    if cfg.mode is not mode:
        raise ConfigError(f"{verb} is for {mode.value} folders (it {does}); folder {cfg.id} "
                          f"is {cfg.mode.value}")


# ---------------------------------------------------------------------------- wiring


def _engine_of(daemon: Any) -> FolderHost | None:
    """The daemon's folder engine, once it has one (``daemon.folders`` implementing
    FolderHost; before the engine, that attribute holds the --share folders)."""
    engine = getattr(daemon, "folders", None)
    if engine is None or not callable(getattr(engine, "config_changed", None)) \
            or not callable(getattr(engine, "status", None)):
        return None
    return engine  # type: ignore[no-any-return]


def register(daemon: Any) -> FolderCommands:
    """Register the folder commands on the daemon's control server (one call from
    daemon.py). The store is the daemon's ``folder_store`` when it has one, else one
    loaded here on first use."""
    own: list[FolderStore] = []

    def store() -> FolderStore:
        shared = getattr(daemon, "folder_store", None)
        if isinstance(shared, FolderStore):
            return shared
        if not own:
            own.append(_config_error(lambda: FolderStore.load(daemon.home)))
        return own[0]

    trust = daemon.trust
    ctx = FolderContext(home=daemon.home, received=daemon.settings.received_path,
                        self_id=daemon.identity.peer_id, resolve=daemon.resolve,
                        is_trusted=trust.is_trusted, label_for=daemon.label_for,
                        share_roots=tuple(Path(d) for d in daemon.settings.shared_dirs))
    commands = FolderCommands(ctx, store, lambda: _engine_of(daemon),
                              getattr(daemon, "start_folder_engine", None))
    commands.register(daemon.control.register)
    return commands


def known_ids(store: FolderStore) -> list[str]:
    return [cfg.id for cfg in store]


def peers_text(labels: Iterable[str]) -> str:
    return ", ".join(labels) or "none (add with --peer)"

