"""The local dashboard: an aiohttp app on 127.0.0.1 and one static page (node/gui/static).

It drives the node only through the control commands the CLI uses (a dispatcher the
daemon passes in); it imports no service and never daemon.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

# what the daemon hands the dashboard: its control dispatcher and the event sink it calls
Emit = Callable[[dict[str, Any]], Awaitable[None]]
Dispatch = Callable[[str, dict[str, Any], Emit], Awaitable[Any]]
