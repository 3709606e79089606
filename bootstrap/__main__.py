"""`python -m bootstrap`: run the bootstrap registration server in the foreground.

Thin: parses flags and calls ``bootstrap.server.run``. Must not import the node daemon.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bootstrap import DEFAULT_PORT, DEFAULT_TTL_S
from bootstrap.limits import (
    BLOCK_AFTER_REFUSALS,
    BLOCK_S,
    BODY_TIMEOUT_S,
    CONCURRENT_PER_SOURCE,
    HEADER_TIMEOUT_S,
    LEGACY_IDS_PER_SOURCE,
    LIST_BURST,
    LIST_RATE_PER_S,
    PACE_BURST,
    PACE_PER_S,
    REGISTER_BURST,
    REGISTER_RATE_PER_S,
    ServerLimits,
)
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
    limits = parser.add_argument_group(
        "per-address limits (an IPv4 address or an IPv6 /64; 0 = unlimited; loopback is not "
        "exempt, the defaults fit ~50 nodes behind one address)")
    limits.add_argument("--register-rate", type=float, default=REGISTER_RATE_PER_S,
                        metavar="PER_S", help="POST/DELETE /register per second "
                        f"(default {REGISTER_RATE_PER_S:g})")
    limits.add_argument("--register-burst", type=int, default=REGISTER_BURST, metavar="N",
                        help=f"registrations at once before the rate applies "
                             f"(default {REGISTER_BURST})")
    limits.add_argument("--list-rate", type=float, default=LIST_RATE_PER_S, metavar="PER_S",
                        help=f"GET /peers per second (default {LIST_RATE_PER_S:g})")
    limits.add_argument("--list-burst", type=int, default=LIST_BURST, metavar="N",
                        help=f"listings at once (default {LIST_BURST})")
    limits.add_argument("--legacy-per-ip", type=int, default=LEGACY_IDS_PER_SOURCE,
                        metavar="N", help="unsigned legacy device ids one address may hold "
                        f"(default {LEGACY_IDS_PER_SOURCE})")
    limits.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                        metavar="S", help="seconds to send request headers, and idle "
                        f"keep-alive timeout (default {HEADER_TIMEOUT_S:g})")
    limits.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, metavar="S",
                        help=f"seconds to send a request body (default {BODY_TIMEOUT_S:g})")
    limits.add_argument("--turns-per-ip", type=int, default=CONCURRENT_PER_SOURCE,
                        metavar="N", help="requests of one address handled at once; more "
                        f"wait their turn (default {CONCURRENT_PER_SOURCE})")
    limits.add_argument("--pace-per-ip", type=float, default=PACE_PER_S, metavar="PER_S",
                        help="turns of one address started per second, after "
                        f"{PACE_BURST} at once (default {PACE_PER_S:g}; 0 = unpaced; "
                        "--turns-per-ip 0 turns pacing off too)")
    limits.add_argument("--block-after", type=int, default=BLOCK_AFTER_REFUSALS, metavar="N",
                        help="connections refused at accept within 1 s (the address ignores "
                        "its 429s) before the kernel drops its connection attempts for "
                        f"--block-for seconds (default {BLOCK_AFTER_REFUSALS}; Linux)")
    limits.add_argument("--block-for", type=float, default=BLOCK_S, metavar="S",
                        help="seconds a flooding address is dropped in the kernel "
                        f"(default {BLOCK_S:g})")
    # scripts/bench_bootstrap.py only: per-request timing at GET /_bench/stats (bootstrap.stats)
    parser.add_argument("--bench-stats", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0-65535")
    if not args.ttl > 0:
        parser.error("--ttl must be positive")
    try:
        server_limits = ServerLimits(
            register_rate_per_s=args.register_rate, register_burst=args.register_burst,
            list_rate_per_s=args.list_rate, list_burst=args.list_burst,
            legacy_ids_per_source=args.legacy_per_ip, header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout, concurrent_per_source=args.turns_per_ip,
            pace_per_s=args.pace_per_ip, block_after_refusals=args.block_after,
            block_s=args.block_for)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bootstrap.server import run

    try:
        run(args.host, args.port, args.db, args.ttl, server_limits, stats=args.bench_stats)
    except P2PError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # last resort: a busy port is already a P2PError
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return LocalIOError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
