"""The dashboard's token (HOME/gui.token, mode 0600, made on first use) and address.

Its own module so that a node can name its dashboard's address (`node gui`) without
loading the dashboard's server (aiohttp: ~14 MB) before anyone connects (node/gui/lazy.py).
"""

from __future__ import annotations

import secrets
import stat
from pathlib import Path

from node.errors import LocalIOError
from node.statefiles import private_dir, write_private

TOKEN_FILE = "gui.token"
TOKEN_BYTES = 32


def load_or_create_token(home: Path) -> str:
    """The node's dashboard token from HOME/gui.token (mode 0600), made on first use."""
    path = home / TOKEN_FILE
    try:
        if path.exists():
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o600)
            token = path.read_text(encoding="ascii").strip()
            if len(token) >= 32 and token.isascii() and token.replace("-", "").replace(
                    "_", "").isalnum():
                return token
        private_dir(home)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        write_private(path, (token + "\n").encode("ascii"))
        return token
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalIOError(f"cannot read or write the dashboard token {path}: {exc}") from None


def url_host(host: str) -> str:
    """The host a browser on this machine opens for a dashboard listening on ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def dashboard_url(host: str, port: int, token: str | None = None) -> str:
    shown = url_host(host)
    shown = f"[{shown}]" if ":" in shown else shown
    base = f"http://{shown}:{port}/"
    return f"{base}?token={token}" if token is not None else base


def dashboard_info(home: Path, host: str, port: int, token: str) -> dict[str, object]:
    """What `node gui` prints."""
    return {"url": dashboard_url(host, port, token), "host": host, "port": port,
            "token_file": str(home / TOKEN_FILE)}
