"""The daemon's own process entry: `node start` runs the node here, without the CLI's libraries.

`node start` parses its flags with typer (node/cli.py), checks the settings and
the identity, and then replaces itself (``os.execv``, same PID, same stdio, same
process group) with ``python -m node.daemon_main '<json>'``. The daemon thus
never loads typer, rich, pydantic and click, which the CLI needs for parsing
and printing and a running node does not: about 10 MB of its resident memory.

The JSON argument holds the home dir and the flag overrides exactly as the CLI
collected them; the settings are loaded again here (config.toml and P2PFS_*
environment, as in the CLI). Errors are reported as the CLI does: one
``error: ...`` line on stderr and the exit code of the error's class.

Before the exec, still in the CLI's process, ``reexec`` creates the home's QUIC
certificate pair if it has none (``prepare_quic``), so that the daemon only
reads it: generating it would leave about 1.5 MB of cryptography's X.509 code
resident in the long-running process.

Must not import typer, rich or node.cli (tests/integration/test_daemon_imports.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from node.config import Settings, load_settings
from node.errors import ConfigError, LocalIOError, P2PError, describe_os_error

MODULE = "node.daemon_main"
# the argument is a few hundred bytes; anything far larger did not come from `node start`
MAX_ARG_BYTES = 64 * 1024
ENV_NO_REEXEC = "P2PFS_NO_REEXEC"  # "1": `node start` runs the daemon in the CLI's process


def setup_logging(settings: Settings | None, level: str = "INFO") -> None:
    """stderr (and, with settings, the home's rotating node.log), messages escaped."""
    from node.logfmt import SafeFormatter
    from node.statefiles import PrivateRotatingFileHandler, private_dir

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings is not None:
        private_dir(settings.home)
        handlers.append(PrivateRotatingFileHandler(
            settings.log_file, maxBytes=5 * 1024 * 1024, backupCount=3))
        level = settings.log_level
    # file names reach log messages: escaped, so a name cannot forge a log line
    for handler in handlers:
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    # kademlia logs every RPC at DEBUG/INFO; keep it quiet unless asked
    for noisy in ("kademlia", "rpcudp", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def exec_argv(home: Path, overrides: dict[str, Any]) -> list[str]:
    """The command line that runs the daemon in a fresh interpreter (same interpreter
    flags: -X, -W, -O ... as this one)."""
    payload = json.dumps({"home": str(home), "overrides": overrides})
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-m", MODULE, payload]


def can_reexec() -> bool:
    return bool(sys.executable) and os.environ.get(ENV_NO_REEXEC, "") != "1"


def prepare_quic(home: Path, *, create: bool) -> None:
    """QUIC listeners serve the pair kept in `home`; with `create`, make it now if missing.
    Nothing when the QUIC library is not installed."""
    import importlib.util

    if importlib.util.find_spec("qh3") is None:
        return
    if create:
        from node.transports.certs import ensure_cert

        ensure_cert(home)
    from node.transports import quic_lazy

    quic_lazy.use_cert_home(home)


def reexec(home: Path, overrides: dict[str, Any]) -> None:
    """Become the daemon process (never returns; OSError if exec fails)."""
    with contextlib.suppress(P2PError):  # the daemon creates the pair itself, and says why not
        prepare_quic(home, create=True)
    argv = exec_argv(home, overrides)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def _parse(argv: list[str]) -> tuple[Path, dict[str, Any]]:
    if len(argv) != 1 or len(argv[0]) > MAX_ARG_BYTES:
        raise ConfigError(f"usage: python -m {MODULE} '{{\"home\": ..., \"overrides\": ...}}' "
                          "(run `node start` instead)")
    try:
        obj = json.loads(argv[0])
    except ValueError:
        obj = None
    if (not isinstance(obj, dict) or not isinstance(obj.get("home"), str)
            or not isinstance(obj.get("overrides"), dict)):
        raise ConfigError(f"{MODULE}: the argument is not the JSON `node start` writes")
    return Path(obj["home"]), obj["overrides"]


def run_start(home: Path, overrides: dict[str, Any]) -> None:
    """Load the settings, set up logging and run the daemon in the foreground."""
    settings = load_settings(home, overrides)
    setup_logging(settings)
    from node.daemon import run_daemon

    run_daemon(settings)


def _error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    try:
        home, overrides = _parse(sys.argv[1:] if argv is None else argv)
        run_start(home, overrides)
    except P2PError as exc:
        _error(str(exc))
        return exc.exit_code
    except OSError as exc:  # last resort: nothing closer to the cause mapped it
        _error(describe_os_error(exc))
        return LocalIOError.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
