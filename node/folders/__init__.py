"""Shared folders: configuration, index, planner, engine (see engine.py's docstring).

The names the daemon needs before (or without) the engine live here, so a node with
no folder configured never imports the engine: it is started on first use (a folder
added, a "folders" channel from a peer, folders.json edited by hand). Imports nothing.
"""

from __future__ import annotations

SERVICE = "folders"  # the channel service of folder sync (node/folders/protocol.py)
FETCH_PREFIX = ".folders"  # fetch paths: .folders/<folder id>/<name>
CONFIG_POLL_S = 2.0  # how often folders.json is checked for a change made by hand
