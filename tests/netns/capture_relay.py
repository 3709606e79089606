"""A relay process for the NAT lab that appends every byte it forwards to a file and,
with --tamper-after N, flips one bit of the Nth byte it forwards from dialer to holder;
with --throttle-mib-s R, forwards at most about R MiB/s in all (it blocks its own loop
after each read: crude, but this relay only serves one lab).

Run: python tests/netns/capture_relay.py --host H --port P --capture FILE
         [--tamper-after N] [--throttle-mib-s R]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootstrap.relay import Circuit, RelayServer  # noqa: E402


class CaptureRelay(RelayServer):
    def __init__(self, capture: Path, tamper_after: int | None,
                 throttle_mib_s: float | None = None) -> None:
        super().__init__()
        self._throttle = throttle_mib_s
        self._out = open(capture, "ab")  # noqa: SIM115 - lives as long as the process
        self._tamper_after = tamper_after
        self._seen = 0

    def forwarded(self, circuit: Circuit, direction: int, data: bytes) -> bytes:
        self._out.write(data)
        self._out.flush()
        if self._throttle:
            time.sleep(len(data) / (self._throttle * 1024 * 1024))
        if direction == 0 and self._tamper_after is not None:
            start, self._seen = self._seen, self._seen + len(data)
            if start <= self._tamper_after < self._seen:
                i = self._tamper_after - start
                data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        return data


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capture", type=Path, required=True)
    parser.add_argument("--tamper-after", type=int, default=None)
    parser.add_argument("--throttle-mib-s", type=float, default=None)
    args = parser.parse_args()
    relay = CaptureRelay(args.capture, args.tamper_after, args.throttle_mib_s)
    await relay.start(args.host, args.port)
    print("relay ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.close()


if __name__ == "__main__":
    asyncio.run(main())
