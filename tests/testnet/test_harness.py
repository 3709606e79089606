"""Tests of the testnet harness (scripts/testnet_lib.py) with real node processes.

The slow tests start a real bootstrap server and real `node start` processes on
127.0.0.1 through the harness and check what a user relies on: nodes list each
other, scenarios pass or fail with a clear report, and nothing is left running.
The fast tests cover the harness's own logic (waiting, scenario parsing, ports).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

import testnet_lib
from testnet_lib import (
    PortAllocator,
    Testnet,
    TestnetError,
    WaitTimeout,
    group_alive,
    load_toml_scenario,
    normalize_peer_id,
    pid_alive,
    run_scenario,
)

JOIN_TIMEOUT_S = 45.0


def _assert_all_gone(pids: list[int]) -> None:
    assert pids, "the harness recorded no processes"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(pid_alive(p) or group_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if pid_alive(p) or group_alive(p)]
    assert not left, f"processes (or their process groups) left running: {left}"


# -- real processes -------------------------------------------------------------


@pytest.mark.slow
def test_three_nodes_list_each_other_and_teardown_leaves_nothing(tmp_path: Path) -> None:
    with Testnet(tmp_path) as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["n1", "n2", "n3"])
        ids = {n: normalize_peer_id(net.peer_id(n)) for n in ("n1", "n2", "n3")}
        assert len(set(ids.values())) == 3
        net.wait_all_see_each_other(timeout=JOIN_TIMEOUT_S)
        for n in ("n1", "n2", "n3"):
            listed = {normalize_peer_id(p["peer_id"]) for p in net.cli(n, "peers")}
            others = {ids[o] for o in ids if o != n}
            assert others <= listed, f"{n} lists {listed}, missing {others - listed}"
            assert ids[n] not in listed, f"{n} lists itself"
            status = net.cli(n, "status")
            assert normalize_peer_id(status["peer_id"]) == ids[n]
        pids = net.all_pids()
        assert len(pids) == 4
        assert all(pid_alive(p) for p in pids)
        logs = net.log_paths()
    _assert_all_gone(pids)
    for path in logs.values():
        assert path.exists() and path.stat().st_size > 0, f"log {path} was not kept"


@pytest.mark.slow
def test_shipped_bootstrap_down_scenario_runs_green(tmp_path: Path) -> None:
    nets: list[Testnet] = []

    def factory(*args: object, **kwargs: object) -> Testnet:
        net = Testnet(*args, **kwargs)  # type: ignore[arg-type]
        nets.append(net)
        return net

    report = run_scenario(SCRIPTS_DIR / "scenarios" / "bootstrap_down.toml", tmp_path,
                          net_factory=factory)
    assert report.ok, report.format()
    assert len(report.steps) == len(load_toml_scenario(
        SCRIPTS_DIR / "scenarios" / "bootstrap_down.toml"))
    assert all(s.ok for s in report.steps)
    assert "PASS" in report.format()
    _assert_all_gone(nets[0].all_pids())


@pytest.mark.slow
def test_failing_step_gives_clear_report_and_still_tears_down(tmp_path: Path) -> None:
    scenario = tmp_path / "fails.toml"
    scenario.write_text(
        """
[[step]]
action = "start_bootstrap"

[[step]]
action = "start"
node = "n1"

[[step]]
name = "n1 sees five peers (it cannot: it is alone)"
action = "assert"
expect = { node = "n1", cli = ["peers", "--json"], len_ge = 5 }

[[step]]
name = "never reached"
action = "start"
node = "n2"
""")
    nets: list[Testnet] = []

    def factory(*args: object, **kwargs: object) -> Testnet:
        net = Testnet(*args, **kwargs)  # type: ignore[arg-type]
        nets.append(net)
        return net

    report = run_scenario(scenario, tmp_path / "net", net_factory=factory)
    assert not report.ok
    assert [s.ok for s in report.steps] == [True, True, False], report.format()
    failed = report.steps[-1]
    assert "n1 sees five peers" in failed.description
    assert "length 0, want >= 5" in failed.error
    text = report.format()
    assert "FAIL" in text and "never reached" not in text
    assert str(nets[0].node("n1").log_path) in text
    assert "n2" not in nets[0].nodes
    _assert_all_gone(nets[0].all_pids())


@pytest.mark.slow
def test_node_that_cannot_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    with Testnet(tmp_path, startup_timeout_s=20) as net:
        with pytest.raises(TestnetError) as info:
            net.add_node("bad", bootstrap=False, extra_args=["--no-such-option"])
        msg = str(info.value)
        assert "bad" in msg and "exited with code" in msg
        assert "--no-such-option" in msg  # the tail of the node's log is in the message
        pids = net.all_pids()
    _assert_all_gone(pids)


@pytest.mark.slow
def test_teardown_kills_the_whole_process_group(tmp_path: Path) -> None:
    # a "node" that ignores SIGTERM and has a child: teardown must SIGKILL both
    code = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(60)\n")
    net = Testnet(tmp_path, stop_grace_s=0.5)
    proc = testnet_lib._spawn([sys.executable, "-c", code], tmp_path / "p.log", net.env, tmp_path)
    net._all_processes.append(proc)
    deadline = time.monotonic() + 10
    child = 0
    while time.monotonic() < deadline and not child:
        lines = (tmp_path / "p.log").read_text().split("\n")
        child = next((int(ln) for ln in lines[1:] if ln.strip().isdigit()), 0)
        time.sleep(0.05)
    assert child and pid_alive(child)
    net.teardown()
    _assert_all_gone([proc.pid, child])


# -- fast: harness logic --------------------------------------------------------


def test_wait_until_times_out_naming_what_and_last_error(tmp_path: Path) -> None:
    net = Testnet(tmp_path)

    def never() -> bool:
        raise ValueError("still booting")

    with pytest.raises(WaitTimeout) as info:
        net.wait_until(never, timeout=0.3, interval=0.05, what="n1 sees n2")
    assert "n1 sees n2" in str(info.value) and "still booting" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert net.wait_until(lambda: 42, timeout=1, what="x") == 42
    net.teardown()


def test_toml_scenario_validation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\naction = "explode"\n')
    with pytest.raises(TestnetError, match="unknown action 'explode'"):
        load_toml_scenario(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'nothing'\n")
    with pytest.raises(TestnetError, match="at least one"):
        load_toml_scenario(empty)
    steps = load_toml_scenario(SCRIPTS_DIR / "scenarios" / "bootstrap_down.toml")
    assert {s["action"] for s in steps} >= {"start", "wait", "stop_bootstrap", "restart"}


def test_unknown_condition_key_is_an_error(tmp_path: Path) -> None:
    net = Testnet(tmp_path)
    with pytest.raises(TestnetError, match="unknown condition"):
        testnet_lib.check_condition(net, {"node": "n1", "lenn_ge": 2}, tmp_path)
    net.teardown()


def test_ports_are_unique_and_free() -> None:
    alloc = PortAllocator()
    ports = [alloc.allocate() for _ in range(40)]
    assert len(set(ports)) == 40
    assert all(1024 <= p <= 65535 for p in ports)


@pytest.mark.slow
def test_cli_help_runs(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPTS_DIR / "testnet.py"), "--help"],
                         check=False, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    for cmd in ("up", "status", "down", "run"):
        assert cmd in res.stdout


@pytest.mark.slow
def test_ctrl_c_during_run_tears_everything_down(tmp_path: Path) -> None:
    scenario = tmp_path / "long.toml"
    scenario.write_text('[[step]]\naction = "start_bootstrap"\n\n'
                        '[[step]]\naction = "start"\nnode = "n1"\n\n'
                        '[[step]]\naction = "sleep"\nseconds = 120\n')
    root = tmp_path / "net"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS_DIR / "testnet.py"), "run", str(scenario), "--dir",
         str(root), "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        daemon_json = root / "nodes" / "n1" / "daemon.json"
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not daemon_json.exists():
            assert proc.poll() is None, "testnet.py run ended before n1 was up"
            time.sleep(0.1)
        assert daemon_json.exists(), "n1 never came up"
        probe = Testnet(root, detached=True)
        started = probe.stray_pids()  # every process whose command line points into root
        assert len(started) >= 2, started
        time.sleep(0.5)  # let the runner reach the sleep step
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    report = json.loads(out)
    assert report["ok"] is False and "interrupted" in report["error"]
    _assert_all_gone(started)
    assert probe.stray_pids() == []
