"""`node send PATH...` and `node receive CODE`: one-shot sends by a code, no trust.

Thin like node/cli.py (which registers these commands with ``register(app)``): it
parses, asks the daemon (node/pairing/send.py does the work), renders progress bars and
prints. `node receive` asks before accepting unless --yes; with stdin not a terminal
and no --yes it refuses before anything is sent, so the code stays usable.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.markup import escape

from node.errors import ConfigError, LocalIOError

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", envvar="P2PFS_HOME", show_envvar=True,
                 help="Node home dir. Default: the platform's user data dir."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
RendezvousOpt = Annotated[
    str | None,
    typer.Option("--rendezvous", help="Pairing mailbox URL (default: the node's first "
                                      "--bootstrap server)."),
]


def _cli() -> ModuleType:
    """node/cli.py (its helpers: _call, handle_errors, the consoles); it imports us while
    it loads, so it is read from sys.modules, never imported at our top."""
    import importlib

    return sys.modules.get("node.cli") or importlib.import_module("node.cli")


def _progress(as_json: bool) -> Any:
    return _cli().transfer_progress(as_json)


def _json_event(ev: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"event": ev}) + "\n")
    sys.stdout.flush()


def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to send.")],
    home: HomeOpt = None,
    expires: Annotated[str, typer.Option("--expires", help="How long the code works: 90s, "
                                                           "10m, 1h.")] = "10m",
    rendezvous: RendezvousOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a one-time code for these files and wait: on the other device `node receive
    CODE` shows the offer and fetches it, verified chunk by chunk. Nobody is trusted
    afterwards; a broken transfer resumes with a new code for the same files."""
    from node.pairing.code import parse_duration_s

    cli = _cli()
    out = cli.out
    try:
        expires_s = parse_duration_s(expires)
    except ValueError as exc:
        raise ConfigError(f"option --expires: {exc}") from None
    for p in paths:
        if not p.exists():
            raise LocalIOError(f"{p} does not exist")
    progress = _progress(as_json)
    bar: list[Any] = []

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if as_json:
            if kind != "waiting":
                _json_event(ev)
            return
        if kind == "code":
            left = max(0.0, float(ev.get("expires_at", 0)) - time.time())
            out.print(f"send code: [bold]{escape(str(ev['code']))}[/]", markup=True)
            out.print(f"on the other device run: node receive {ev['code']}   "
                      f"(works once, for {cli._duration_text(left)})")
        elif kind == "matched":
            # the name is the other side's to choose: shown, never read as rich markup
            out.print(f"receiver {ev.get('fingerprint')} (calls itself "
                      f"{ev.get('name') or '-'!r}); waiting for it to accept")
        elif kind == "progress":
            if not bar:
                bar.append(progress.add_task("sending", total=ev.get("bytes_total") or None))
            progress.update(bar[0], completed=ev.get("bytes_done", 0),
                            total=ev.get("bytes_total") or None)
        sys.stdout.flush()

    with progress:
        res = cli._call(home, "send", {"paths": [str(p.resolve()) for p in paths],
                                       "expires_s": expires_s, "rendezvous": rendezvous},
                        on_event=on_event)
    if as_json:
        cli._print_json(res)
        return
    out.print(f"sent {len(res['files'])} file(s), {cli._size(res['bytes_total'])} to "
              f"{res['peer_id'][:7]}, verified by the receiver; no trust was added")


def receive(
    code: Annotated[str, typer.Argument(help="The code `node send` printed.")],
    home: HomeOpt = None,
    dest: Annotated[Path | None, typer.Option(
        "--dir", help="Folder the files land in (default: RECEIVED_DIR/from-<sender "
                      "short id>).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Accept without asking.")] = False,
    rendezvous: RendezvousOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Use a code from `node send`: show what is offered (names, sizes), ask, then fetch
    it, verified chunk by chunk. Nobody is trusted afterwards."""
    from node.pairing.code import parse_code

    cli = _cli()
    out, err = cli.out, cli.err
    parse_code(code)  # a mistyped code is said before asking the node
    if not yes and not sys.stdin.isatty():
        raise ConfigError("not asking: stdin is not a terminal; run it in one, or pass "
                          "--yes to accept the offer without asking (the code was not used)")
    target = str(dest.expanduser().resolve()) if dest is not None else ""
    if target:  # said before the code is used (the sender would be told to send again)
        cli.check_writable_folder(Path(target), "--dir", "pick another folder")
    offer = cli._call(home, "receive_offer", {"code": code, "rendezvous": rendezvous,
                                              "dir": target})
    if as_json:
        _json_event({"type": "offer", **offer})
    else:
        out.print(f"{offer['fingerprint']} (calls itself "
                  f"{offer.get('name') or '-'!r}) offers "
                  f"{len(offer['files'])} file(s), {cli._size(offer['bytes_total'])}:")
        for f in offer["files"]:
            out.print(f"  {f['path']}  {cli._size(f['size'])}")
        out.print(f"into {target or offer['default_dir']}")
    accept = True
    if not yes:
        try:
            accept = typer.confirm("accept?", default=False, err=True)
        except (EOFError, typer.Abort):
            accept = False
    progress = _progress(as_json)
    bar: list[Any] = []

    def on_event(ev: dict[str, Any]) -> None:
        if ev.get("type") != "progress":
            return
        if as_json:
            _json_event(ev)
            return
        if not bar:
            bar.append(progress.add_task("receiving", total=ev.get("bytes_total") or None))
        progress.update(bar[0], completed=ev.get("bytes_done", 0),
                        total=ev.get("bytes_total") or None)

    with progress:
        res = cli._call(home, "receive_accept", {"session": offer["session"], "accept": accept,
                                                 "dir": target}, on_event=on_event)
    if as_json:
        cli._print_json(res)
    elif res.get("state") == "declined":
        err.print("declined; nothing was received")
    else:
        resumed = res.get("bytes_resumed", 0)
        again = f" ({cli._size(resumed)} resumed from an earlier try)" if resumed else ""
        out.print(f"received {len(res['files'])} file(s), {cli._size(res['bytes_total'])}"
                  f"{again} into {res['dir']}, every chunk verified; no trust "
                  "was added")
    if res.get("state") == "declined":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `send` and `receive` to the root app (called by node/cli.py)."""
    handle_errors = _cli().handle_errors
    app.command("send")(handle_errors(send))
    app.command("receive")(handle_errors(receive))
