"""The dashboard in a real headless Chromium against a real 2-node testnet.

Node A's dashboard is driven by the browser; node B is its peer. One testnet and one
browser serve the whole module. Every wait is a WebDriverWait (or the harness's
wait_until) on a condition; a `window.__stay` marker set before an action and read
after proves the page changed without a reload. A screenshot of each page is written
under the module's temp dir (the path is printed), or in $P2PFS_SCREENSHOT_DIR.
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

JOIN_TIMEOUT_S = 30.0
SHARE_BYTES = 24 * 1024 * 1024  # big enough that a progress row shows while it moves


@dataclass
class Net:
    net: Testnet
    url: str  # A's dashboard, with its token
    base: str  # the same without the token
    shots: Path
    data: Path


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("dashboard")
    with Testnet(root / "net", gui=True) as net:
        net.start_bootstrap(ttl_s=60)
        docs = root / "docs"
        docs.mkdir()
        (docs / "plan.txt").write_text("the plan\n")
        net.add_node("A", share=[docs], start=False)
        net.add_node("B", start=False)
        net.start_many(["A", "B"])
        net.wait_all_see_each_other(["A", "B"], timeout=JOIN_TIMEOUT_S)
        # B trusts A; A does not trust B yet (the page does that)
        net.cli("B", "trust", net.peer_id("A"), "--name", "A", json=False)
        url = net.gui_url("A")
        # P2PFS_SCREENSHOT_DIR keeps them (docs/dashboard.png is one of them)
        shots = Path(os.environ.get("P2PFS_SCREENSHOT_DIR") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        data = root / "data"
        data.mkdir()
        print(f"dashboard screenshots in {shots}")
        yield Net(net, url, url.split("?", 1)[0], shots, data)




def _transfer_rows(browser: Any) -> list[dict[str, Any]]:
    """The transfers table as data, read in one script (rows re-render while we look)."""
    return list(browser.execute_script("""
        return [...document.querySelectorAll('#transfers-table tbody tr')].map(r => ({
          id: r.dataset.transferId, state: r.dataset.state,
          pct: r.querySelector('.pct').textContent,
          value: r.querySelector('progress').value}));"""))


def _css(browser: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, selector))


def _open(browser: Any, tn: Net, page: str) -> None:
    show_page(browser, tn.url, tn.base, page)


def _stayed(browser: Any) -> bool:
    return bool(browser.execute_script("return window.__stay === 1"))


def _peer_row(browser: Any, peer_id: str) -> Any | None:
    for row in _css(browser, "#peers-table tbody tr"):
        if normalize_peer_id(row.get_attribute("data-peer-id") or "") == peer_id:
            return row
    return None


def _trust_a_to_b(tn: Net) -> None:
    if not any(normalize_peer_id(t["peer_id"]) == normalize_peer_id(tn.net.peer_id("B"))
               for t in tn.net.cli("A", "trusted")):
        tn.net.cli("A", "trust", tn.net.peer_id("B"), "--name", "B", json=False)


def test_refused_without_the_token_and_loads_with_it(browser: Any, tn: Net) -> None:
    browser.get(tn.base)
    _wait(browser, lambda d: "refused" in d.find_element("tag name", "body").text,
          "the page without the token is refused")
    assert "p2pfs" not in browser.title  # the dashboard itself never loaded
    browser.get(tn.url)
    _wait(browser, lambda d: d.find_element("id", "node-name").text.startswith("A ·"),
          "the page loads with the token and shows the node")
    # the token left the address bar (a redirect put a session cookie in its place)
    assert "token=" not in browser.current_url
    cookie = next(c for c in browser.get_cookies() if c["name"].startswith("p2pfs_session_"))
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_lists_the_peers_of_the_testnet(browser: Any, tn: Net) -> None:
    _open(browser, tn, "peers")
    b_id = normalize_peer_id(tn.net.peer_id("B"))
    row = _wait(browser, lambda d: _peer_row(d, b_id), "B is listed on A's peers page")
    cells = [c.text for c in row.find_elements("tag name", "td")]
    assert cells[0] == "B"  # its name

    def b_row() -> dict[str, Any]:
        return next(p for p in tn.net.cli("A", "peers")
                    if normalize_peer_id(p["peer_id"]) == b_id)

    _wait(browser, lambda d: (r := _peer_row(d, b_id)) is not None and r.find_element(
        "css selector", "td.online").text == ("yes" if b_row()["online"] else "no"),
        "B's online cell says what `node peers` says")

    def path_shown(d: Any) -> bool:  # the open channels' paths, "-" without one
        paths = b_row()["paths"]
        row = _peer_row(d, b_id)
        return row is not None and row.find_element("css selector", "td.path").text == (
            ", ".join(paths) if paths else "-")

    _wait(browser, path_shown, "B's path cell says what `node peers` says")
    browser.save_screenshot(str(tn.shots / "peers.png"))


def test_trusting_a_peer_from_the_page_takes_effect_in_the_node(browser: Any, tn: Net) -> None:
    b_id = normalize_peer_id(tn.net.peer_id("B"))
    if any(normalize_peer_id(t["peer_id"]) == b_id for t in tn.net.cli("A", "trusted")):
        tn.net.cli("A", "untrust", tn.net.peer_id("B"), json=False)
    _open(browser, tn, "peers")
    _wait(browser, lambda d: _peer_row(d, b_id) is not None
          and _peer_row(d, b_id).find_elements("css selector", "button.trust"),
          "B shows a Trust button")

    def click_trust(d: Any) -> bool:
        _peer_row(d, b_id).find_element("css selector", "button.trust").click()
        return True

    _wait(browser, click_trust, "the Trust button of B was clicked")
    tn.net.wait_until(lambda: any(normalize_peer_id(t["peer_id"]) == b_id
                                  for t in tn.net.cli("A", "trusted")), WAIT_S,
                      what="A's trust store lists B")
    # the running node acts on it: A's daemon reports B trusted, and a channel opens
    peers = {normalize_peer_id(p["peer_id"]): p for p in tn.net.cli("A", "peers")}
    assert peers[b_id]["trusted"] is True
    assert tn.net.cli("A", "ping", "B", "--count", "1")["rtt_ms"]
    _wait(browser, lambda d: (r := _peer_row(d, b_id)) is not None
                and r.find_element("css selector", "td.trusted").text == "yes" and r,
                "the page shows B trusted")
    assert _stayed(browser)


def test_a_share_from_the_cli_shows_a_live_progress_bar_to_100(browser: Any, tn: Net) -> None:
    _trust_a_to_b(tn)
    big = tn.data / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(SHARE_BYTES)
    _open(browser, tn, "transfers")
    before = {r["id"] for r in _transfer_rows(browser)}
    share = subprocess.Popen([*tn.net.node_cmd, "share", str(big), "--to", "B", "--json",
                              "--home", str(tn.net.node("A").home)], env=tn.net.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def new_row(d: Any) -> dict[str, Any] | None:
            return next((r for r in _transfer_rows(d) if r["id"] not in before), None)

        first = _wait(browser, new_row, "the share shows up on the transfers page")

        def finished(d: Any) -> dict[str, Any] | None:
            row = next(r for r in _transfer_rows(d) if r["id"] == first["id"])
            return row if row["state"] == "done" and row["pct"] == "100%" else None

        last = _wait(browser, finished, "the progress bar reaches 100 % and the transfer is done")
        assert last["value"] == 100
        assert share.wait(timeout=WAIT_S) == 0, share.stderr.read() if share.stderr else ""
    finally:
        if share.poll() is None:
            share.kill()
            share.wait()
        if share.stderr:
            share.stderr.close()
    assert _stayed(browser)  # live: the page was never reloaded
    browser.save_screenshot(str(tn.shots / "transfers.png"))


def test_a_new_event_appears_without_reload(browser: Any, tn: Net) -> None:
    _trust_a_to_b(tn)
    _open(browser, tn, "events")
    _wait(browser, lambda d: d.find_element("id", "live").text.endswith("live"),
          "the event stream is connected")
    seen = {li.get_attribute("data-event-id") for li in _css(browser, "#events-list li")}
    note = tn.data / "note.txt"
    note.write_text("hello from the dashboard test\n")
    # a share to every trusted peer is announced: a signed "shared" event, notified locally
    tn.net.cli("A", "share", str(note), json=False)

    def new_event(d: Any) -> Any:
        for li in _css(d, "#events-list li"):
            if li.get_attribute("data-event-id") not in seen and "note.txt" in li.text:
                return li
        return None

    li = _wait(browser, new_event, "the share's notification appears on the events page")
    assert li.get_attribute("data-kind") == "file_shared"
    assert _stayed(browser)
    browser.save_screenshot(str(tn.shots / "events.png"))


def test_share_a_file_from_the_page(browser: Any, tn: Net) -> None:
    _trust_a_to_b(tn)
    f = tn.data / "from-the-page.txt"
    f.write_text("shared from the dashboard\n")
    _open(browser, tn, "folders")
    browser.find_element("id", "share-path").send_keys(str(f))
    browser.find_element("id", "share-to").send_keys("B")
    browser.find_element("css selector", "#share-form button").click()
    _wait(browser, lambda d: "started 1 transfer" in d.find_element("id", "share-result").text,
          "the page says the share started")
    received = tn.net.node("B").home / "received" / "A" / f.name
    tn.net.wait_until(lambda: received.is_file() and received.read_text() == f.read_text(),
                      WAIT_S, what="B received the file shared from A's page")
    # a path that is not on this machine is refused with the node's own words
    browser.find_element("id", "share-path").clear()
    browser.find_element("id", "share-path").send_keys(str(tn.data / "missing.txt"))
    browser.find_element("css selector", "#share-form button").click()
    _wait(browser, lambda d: "does not exist" in d.find_element("id", "error").text,
          "the page shows why the share was refused")


def test_folders_and_log_pages_render(browser: Any, tn: Net) -> None:
    _open(browser, tn, "folders")

    def docs_row(d: Any) -> list[str] | None:
        rows = [r for r in _css(d, "#folders-table tbody tr")
                if r.get_attribute("data-label") == "docs"]
        return [c.text for c in rows[0].find_elements("tag name", "td")] if rows else None

    cells = _wait(browser, docs_row, "A's --share folder is listed")
    assert cells[2:5] == ["send-only", "watching", "1"]  # mode, state, files in the index
    browser.save_screenshot(str(tn.shots / "folders.png"))
    _open(browser, tn, "log")
    _wait(browser, lambda d: any("note.txt" in r.text for r in
                                 _css(d, "#log-table tbody tr")), "the log lists the share")
    browser.find_element("id", "log-path").send_keys("docs*")
    browser.find_element("css selector", "#log-form button").click()
    _wait(browser, lambda d: not any("note.txt" in r.text for r in
                                     _css(d, "#log-table tbody tr")), "the search filters")
    browser.save_screenshot(str(tn.shots / "log.png"))


def test_untrust_through_the_api_with_curl_style_bearer(tn: Net) -> None:
    """The API the page uses works without a browser; DELETE untrusts in the node."""
    _trust_a_to_b(tn)
    token = (tn.net.node("A").home / "gui.token").read_text().strip()
    b_id = tn.net.peer_id("B")
    request = urllib.request.Request(f"{tn.base}api/trust/{b_id}", method="DELETE",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=WAIT_S) as r:
        assert r.status == 200 and json.loads(r.read())["trusted"] is False
    # the running node acts on it at once (and its trust store stays sound)
    res = tn.net.cli("A", "ping", "B", "--count", "1", json=False, check=False)
    assert res.returncode != 0 and "trust" in res.stderr.lower()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{tn.base}api/peers", timeout=WAIT_S)
    refused.value.close()
    assert refused.value.code == 401
