"""One-shot sends with real node processes: `node send FILE` on one, `node receive CODE`
on the other, between two nodes that do not trust each other (and still do not after);
`node receive` without --yes on a non-terminal stdin refuses; a receiver killed with
SIGKILL mid-transfer resumes with a new code from the same sender.

The sender "s" sits behind a loopback proxy (it advertises 127.0.0.2, the proxy
forwards to its real port) that the resume test throttles, so the kill lands
mid-transfer; the receiver fetches, so the proxy sees the bulk data."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id, tail  # noqa: E402

from node.identity import PeerId  # noqa: E402
from tests.testnet.test_transfer_e2e import (  # noqa: E402
    PROXY_HOST,
    LoopbackProxy,
    random_file,
    sha256_file,
)

pytestmark = pytest.mark.slow

MIB = 1 << 20
THROTTLE_BPS = 4_000_000
CLI_WAIT_S = 60.0


class Net:
    def __init__(self, net: Testnet, proxy: LoopbackProxy, work: Path) -> None:
        self.net, self.proxy, self.work = net, proxy, work


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """bootstrap + s (the sender, behind the proxy: unthrottled unless a test says so) and
    r (the receiver); neither trusts the other."""
    root = tmp_path_factory.mktemp("send")
    work = root / "files"
    work.mkdir()
    with Testnet(root / "net") as net:
        net.start_bootstrap(ttl_s=60)
        net.add_node("s", extra_args=["--advertise-host", PROXY_HOST], start=False)
        net.add_node("r", start=False)
        net.start_many(["s", "r"])
        port = net.node("s").ports["tcp"]
        proxy = LoopbackProxy((PROXY_HOST, port), ("127.0.0.1", port))
        try:
            yield Net(net, proxy, work)
        finally:
            proxy.close()
            net.teardown()


def start_send(net: Testnet, name: str, *paths: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [*net.node_cmd, "send", *[str(p) for p in paths], "--json",
           "--home", str(net.node(name).home)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        proc.wait(10)
        raise AssertionError(f"send printed no code: {proc.stderr.read() if proc.stderr else ''}")
    event = json.loads(first)["event"]
    assert event["type"] == "code"
    return proc, event["code"]


def finish(proc: subprocess.Popen[str]) -> tuple[int, Any, str]:
    out, err = proc.communicate(timeout=CLI_WAIT_S)
    return proc.returncode, last_json(out), err


def last_json(out: str) -> Any:
    """`--json` output: event lines (`{"event": ...}`), then the result object."""
    rest = [line for line in out.splitlines() if not line.startswith('{"event": ')]
    text = "\n".join(rest).strip()
    return json.loads(text) if text else None


def receive(net: Testnet, name: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return net.cli(name, "receive", code, *args, json=False, check=False, timeout=CLI_WAIT_S)


def from_dir(net: Testnet, receiver: str, sender: str) -> Path:
    h = net.node(receiver)
    base = h.received_dir or h.home / "received"
    return base / f"from-{PeerId.parse(normalize_peer_id(net.peer_id(sender))).short}"


def assert_no_trust(net: Testnet, *names: str) -> None:
    for n in names:
        assert net.cli(n, "trusted") == [], f"{n} trusts someone"


def test_send_20mb_between_untrusting_nodes(tn: Net) -> None:
    """Also: `node receive` without --yes on a non-terminal stdin refuses before the code
    is used, so the same code then works with --yes."""
    net = tn.net
    f = random_file(tn.work / "big.bin", 20 * MIB + 321)
    target = from_dir(net, "r", "s") / "big.bin"
    proc, code = start_send(net, "s", f)
    try:
        refused = receive(net, "r", code)  # stdin is /dev/null: nobody can be asked
        assert refused.returncode != 0
        assert "stdin is not a terminal" in refused.stderr and "--yes" in refused.stderr
        assert "Traceback" not in refused.stderr and not target.exists()
        res = receive(net, "r", code, "--yes", "--json")
        assert res.returncode == 0, res.stderr + tail(net.node("r").node_log)
        got = last_json(res.stdout)
        rc, sent, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, err + tail(net.node("s").node_log)
    assert sha256_file(target) == sha256_file(f)
    assert got["state"] == "done" and got["bytes_total"] == 20 * MIB + 321
    assert got["files"][0]["saved_as"] == str(target) and got["trusted"] is False
    assert any(json.loads(line)["event"]["type"] == "progress"
               for line in res.stdout.splitlines() if line.startswith('{"event": '))
    assert sent["state"] == "done" and sent["trusted"] is False
    assert normalize_peer_id(sent["peer_id"]) == normalize_peer_id(net.peer_id("r"))
    assert_no_trust(net, "s", "r")


def test_receiver_killed_mid_send_resumes_with_a_new_code(tn: Net) -> None:
    net, proxy = tn.net, tn.proxy
    size = 16 * MIB
    f = random_file(tn.work / "resume.bin", size)
    folder = from_dir(net, "r", "s")
    proxy.rate_bps = THROTTLE_BPS
    proc, code = start_send(net, "s", f)
    cmd = [*net.node_cmd, "receive", code, "--yes", "--json", "--home", str(net.node("r").home)]
    rcv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    try:
        net.wait_until(lambda: list(folder.glob(".resume.bin.*.p2pfs-state")), 30,
                       interval=0.05, what="r saved resume state")
        net.kill("r")
        proxy.rate_bps = None
        rcv.communicate(timeout=CLI_WAIT_S)
        assert rcv.returncode != 0
        rc, _, err = finish(proc)
        assert rc != 0 and "run `node send` again" in err, err
    finally:
        proxy.rate_bps = None
        for p in (rcv, proc):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not (folder / "resume.bin").exists()
    assert list(folder.glob(".resume.bin.*.p2pfs-part"))

    net.start("r")
    proc, code = start_send(net, "s", f)
    try:
        res = receive(net, "r", code, "--yes", "--json")
        assert res.returncode == 0, res.stderr + tail(net.node("r").node_log)
        got = last_json(res.stdout)
        rc, _, err = finish(proc)
        assert rc == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert sha256_file(folder / "resume.bin") == sha256_file(f)
    # the second run moved only what the killed receiver had not verified
    assert 0 < got["bytes_received"] < size, got
    assert got["bytes_resumed"] > 0
    assert_no_trust(net, "s", "r")


def test_an_invitation_code_given_to_receive_fails_on_both_sides(tn: Net) -> None:
    net = tn.net
    cmd = [*net.node_cmd, "invite", "--json", "--home", str(net.node("s").home)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        code = json.loads(proc.stdout.readline())["event"]["code"]
        res = receive(net, "r", code, "--yes")
        assert res.returncode != 0 and "wrong code" in res.stderr, res.stderr
        assert "`node accept`" in res.stderr and "Traceback" not in res.stderr
        _, err = proc.communicate(timeout=CLI_WAIT_S)
        assert proc.returncode != 0 and "wrong code" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_no_trust(net, "s", "r")


def test_declining_at_the_prompt_sends_nothing(tn: Net) -> None:
    """On a terminal `node receive` shows the offer and asks; "n" declines: nothing is
    written and the sender is told."""
    import os
    import pty

    net = tn.net
    f = random_file(tn.work / "unwanted.bin", 5000)
    proc, code = start_send(net, "s", f)
    leader, follower = pty.openpty()
    rcv = subprocess.Popen([*net.node_cmd, "receive", code, "--home",
                            str(net.node("r").home)], stdin=follower, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=net.env, cwd=net.root)
    os.close(follower)
    try:
        os.write(leader, b"n\n")  # typed ahead: read once the question is asked
        out, err = rcv.communicate(timeout=CLI_WAIT_S)
        rc, _, send_err = finish(proc)
    finally:
        os.close(leader)
        for p in (rcv, proc):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert "unwanted.bin" in out and "5.0 KB" in out, out + err
    assert rcv.returncode != 0 and "declined" in err, err
    assert rc != 0 and "declined" in send_err, send_err
    assert not (from_dir(net, "r", "s") / "unwanted.bin").exists()
    assert_no_trust(net, "s", "r")
