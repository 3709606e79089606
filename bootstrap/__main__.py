"""`python -m bootstrap`: run the bootstrap registration server in the foreground.

Thin: parses flags and calls ``bootstrap.server.run``. Must not import the node daemon.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bootstrap import DEFAULT_PORT, DEFAULT_TTL_S
from node.errors import LocalIOError, P2PError, describe_os_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bootstrap",
        description="p2pfs bootstrap registration server (aiohttp + SQLite)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"listen port, 0 = any free one (default {DEFAULT_PORT})")
    parser.add_argument("--db", type=Path, default=None,
                        help="SQLite registry file (default: user data dir/bootstrap.sqlite3)")
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL_S,
                        help=f"seconds a registration stays online unless refreshed "
                             f"(default {DEFAULT_TTL_S:.0f})")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0-65535")
    if not args.ttl > 0:
        parser.error("--ttl must be positive")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bootstrap.server import run

    try:
        run(args.host, args.port, args.db, args.ttl)
    except P2PError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # last resort: a busy port is already a P2PError
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return LocalIOError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
