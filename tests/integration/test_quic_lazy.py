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


CERT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from node import daemon_main
    from node.transports import get_transport

    home = Path(sys.argv[1])
    daemon_main.prepare_quic(home, create=False)  # what the daemon does at start

    async def main():
        async def echo(pipe):
            await pipe.send(bytes(await pipe.recv()))
            await asyncio.sleep(0.5)

        listener = await get_transport("quic").listen("127.0.0.1", 0, echo)
        pipe = await get_transport("quic").connect("127.0.0.1", listener.port, timeout=10)
        await pipe.send(b"hi")
        assert bytes(await asyncio.wait_for(pipe.recv(), 10)) == b"hi"
        await pipe.close()
        await listener.close()
        print(sorted(m for m in sys.modules if m.startswith("cryptography.x509")))

    asyncio.run(main())
""")


def test_node_start_makes_the_cert_so_the_daemon_never_loads_x509(tmp_path) -> None:
    """`node start` creates the QUIC pair before it execs the daemon (prepare_quic with
    create=True, in the CLI's process); the daemon then serves it from the home, checked
    with qh3, without importing cryptography's X.509 code (~1.5 MB resident)."""
    from node.daemon_main import prepare_quic
    from node.transports.certs import CERT_FILE_NAME, KEY_FILE_NAME

    prepare_quic(tmp_path, create=True)
    pair = (tmp_path / CERT_FILE_NAME).read_bytes(), (tmp_path / KEY_FILE_NAME).read_bytes()
    res = subprocess.run([sys.executable, "-c", CERT_SCRIPT, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
    # served from the home, not replaced
    assert ((tmp_path / CERT_FILE_NAME).read_bytes(), (tmp_path / KEY_FILE_NAME).read_bytes()) \
        == pair
