"""A node listening on QUIC loads qh3 only at the first datagram (node/transports/quic_lazy.py).

Run in a fresh interpreter (pytest itself has imported qh3): listen through the
registry, check that qh3 is not imported, then dial the listener; the first
datagrams are held, handed to the real listener, and a message goes both ways.
Under asyncio's own loop and under uvloop (which the daemon uses).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from node.transports import get_transport

    async def main():
        async def echo(pipe):
            await pipe.send(b"re:" + bytes(await pipe.recv()))
            await asyncio.sleep(0.5)

        listener = await get_transport("quic").listen("127.0.0.1", 0, echo)
        assert listener.port > 0
        assert "qh3" not in sys.modules, "listening imported qh3"
        assert not listener.started
        pipe = await get_transport("quic").connect("127.0.0.1", listener.port, timeout=10)
        await pipe.send(b"hello")
        reply = await asyncio.wait_for(pipe.recv(), 10)
        assert bytes(reply) == b"re:hello", reply
        assert listener.started
        await pipe.close()
        await listener.close()
        print("ok")

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
""")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_quic_listener_imports_qh3_only_at_its_first_datagram(loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    res = subprocess.run([sys.executable, "-c", SCRIPT, loop], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ok", res.stdout


def test_closing_an_unused_quic_listener_frees_its_port() -> None:
    code = textwrap.dedent("""
        import asyncio, socket, sys
        from node.transports import get_transport

        async def main():
            async def handler(pipe):
                pass
            listener = await get_transport("quic").listen("127.0.0.1", 0, handler)
            port = listener.port
            await listener.close()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", port))
            s.close()
            assert "qh3" not in sys.modules
            print("ok")

        asyncio.run(main())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
