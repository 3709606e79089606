"""Pairing from the dashboard's peers page, in a real headless Chromium: "Invite" shows a
code and waits until another device accepts it; "Accept a code" pairs with a code from
`node invite` on another device. Both take effect in the nodes (both trust lists).

Node P's dashboard is driven by the browser; Q accepts P's invitation from its CLI, R
invites from its CLI. A state-changing pairing request without the session's CSRF token
is refused. Screenshots go under the module's temp dir (or $P2PFS_SCREENSHOT_DIR).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet, normalize_peer_id  # noqa: E402

from tests.browser.pages import WAIT_S, show_page
from tests.browser.pages import wait_for as _wait

pytestmark = pytest.mark.slow



@dataclass
class Net:
    net: Testnet
    url: str
    base: str
    shots: Path


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("dashboard-pairing")
    with Testnet(root / "net", gui=True) as net:
        net.start_bootstrap(ttl_s=60)
        net.add_nodes(["P", "Q", "R"])
        url = net.gui_url("P")
        shots = Path(os.environ.get("P2PFS_SCREENSHOT_DIR") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield Net(net, url, url.split("?", 1)[0], shots)




def _open_peers(browser: Any, tn: Net) -> None:
    show_page(browser, tn.url, tn.base, "peers")


def _trusts(net: Testnet, who: str, whom: str) -> bool:
    want = normalize_peer_id(net.peer_id(whom))
    return any(normalize_peer_id(t["peer_id"]) == want for t in net.cli(who, "trusted"))


def _state(browser: Any, element_id: str) -> str:
    return str(browser.find_element("id", element_id).get_attribute("data-state") or "")


def test_invite_from_the_page_shows_a_code_and_pairs(browser: Any, tn: Net) -> None:
    net = tn.net
    _open_peers(browser, tn)
    browser.find_element("id", "invite-name").send_keys("q-laptop")
    browser.find_element("id", "invite-button").click()
    code = _wait(browser, lambda d: d.find_element("id", "invite-code").text.strip(),
                 "the page shows the invitation code")
    assert browser.find_element("id", "invite-status").is_displayed()
    browser.save_screenshot(str(tn.shots / "peers-invite.png"))
    res = net.cli("Q", "accept", code, "--name", "p", json=False, check=False)
    assert res.returncode == 0, res.stderr
    _wait(browser, lambda d: _state(d, "invite-result") == "paired",
          "the page shows the pairing's outcome")
    text = browser.find_element("id", "invite-result").text
    assert "paired" in text and "q-laptop" in text and "verification words" in text
    assert _trusts(net, "P", "Q") and _trusts(net, "Q", "P")
    row = [t for t in net.cli("P", "trusted") if t["alias"] == "q-laptop"]
    assert row and row[0]["added_via"] == "invite"
    # the peers table shows Q as trusted without a reload
    q_id = normalize_peer_id(net.peer_id("Q"))
    _wait(browser, lambda d: any(
        normalize_peer_id(r.get_attribute("data-peer-id") or "") == q_id
        and r.find_element("css selector", ".trusted").text == "yes"
        for r in d.find_elements("css selector", "#peers-table tbody tr")),
        "the peers table lists Q as trusted")


def test_accept_a_code_from_the_page(browser: Any, tn: Net) -> None:
    net = tn.net
    cmd = [*net.node_cmd, "invite", "--json", "--name", "p", "--home", str(net.node("R").home)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=net.env, cwd=net.root, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        code = json.loads(proc.stdout.readline())["event"]["code"]
        _open_peers(browser, tn)
        browser.find_element("id", "accept-code").send_keys(code)
        browser.find_element("id", "accept-name").send_keys("r-phone")
        browser.find_element("css selector", "#accept-form button[type=submit]").click()
        _wait(browser, lambda d: _state(d, "accept-result") in ("paired", "failed"),
              "the accept form shows its outcome")
        assert _state(browser, "accept-result") == "paired", \
            browser.find_element("id", "error").text
        browser.save_screenshot(str(tn.shots / "peers-accepted.png"))
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "r-phone" in browser.find_element("id", "accept-result").text
    assert _trusts(net, "P", "R") and _trusts(net, "R", "P")


def test_pairing_endpoints_refuse_without_token_or_csrf(tn: Net) -> None:
    def post(path: str, headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"{tn.base}{path}", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **headers})
        try:
            with urllib.request.urlopen(request, timeout=WAIT_S) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)

    assert post("api/invite", {}) == 401
    assert post("api/accept", {}) == 401
    # a cookie session without its CSRF token: log in, then POST with the cookie only
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(tn.url, timeout=WAIT_S) as r:
        assert r.status == 200
    request = urllib.request.Request(f"{tn.base}api/invite", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(request, timeout=WAIT_S)
    refused.value.close()
    assert refused.value.code == 403
    # with the Bearer token, a bad body is a clear 400 (and no invitation starts)
    token = (tn.net.node("P").home / "gui.token").read_text().strip()
    assert post("api/accept", {"Authorization": f"Bearer {token}"}) == 400
