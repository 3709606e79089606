"""The folders page in a real headless Chromium against a real node process: a folder
added from the CLI is listed; Pause on the page changes `node folder list --json`; a
folder added from the page's form is in the node; a `folder_offered` notification is
rendered on the events page and its Add button prefills the form."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from testnet_lib import Testnet  # noqa: E402

from tests.browser.pages import WAIT_S, show_page
from tests.browser.pages import wait_for as _wait

pytestmark = pytest.mark.slow



@dataclass
class Net:
    net: Testnet
    url: str
    root: Path
    shots: Path


@pytest.fixture(scope="module")
def tn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("dashfolders")
    with Testnet(root / "net", gui=True) as net:
        net.add_node("A", bootstrap=False, start=False)
        net.add_node("B", bootstrap=False, start=False)  # a peer to share with; not running
        net.cli("A", "trust", net.peer_id("B"), "--name", "bob", json=False)
        net.start("A")
        shots = Path(os.environ.get("P2PFS_SCREENSHOT_DIR") or root / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield Net(net, net.gui_url("A"), root, shots)




def _open(browser: Any, tn: Net, page: str) -> None:
    show_page(browser, tn.url, tn.url.split("?", 1)[0], page)


def _folder_rows(browser: Any) -> dict[str, dict[str, Any]]:
    """The synced folders table as data, read in one script (rows re-render)."""
    rows = browser.execute_script("""
        return [...document.querySelectorAll('#sync-folders-table tbody tr')].map(r => ({
          id: r.dataset.folderId, state: r.dataset.state,
          cells: [...r.querySelectorAll('td')].map(c => c.textContent),
          buttons: [...r.querySelectorAll('button')].map(b => b.className)}));""")
    return {r["id"]: r for r in rows}


def _listed(tn: Net) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in tn.net.cli("A", "folder", "list")}


def test_a_folder_added_from_the_cli_is_listed_and_pause_on_the_page_reaches_the_node(
        browser: Any, tn: Net) -> None:
    photos = tn.root / "Photos"
    photos.mkdir()
    tn.net.cli("A", "folder", "add", str(photos), "--id", "photos", "--peer", "bob",
               "--label", "Family photos")
    _open(browser, tn, "folders")
    row = _wait(browser, lambda d: _folder_rows(d).get("photos"),
                "the folder added from the CLI is listed")
    cells = row["cells"]
    assert cells[:4] == ["photos", "Family photos", str(photos.resolve()), "send-receive"]
    assert cells[4] == "idle" and cells[7] == "bob"
    assert _listed(tn)["photos"]["paused"] is False

    browser.find_element("css selector",
                         '#sync-folders-table tr[data-folder-id="photos"] button.pause').click()
    tn.net.wait_until(lambda: _listed(tn)["photos"]["paused"] is True, WAIT_S,
                      what="`node folder list --json` shows the folder paused")
    row = _wait(browser, lambda d: (r := _folder_rows(d).get("photos")) is not None
                and r["state"] == "paused" and r, "the page shows it paused")
    assert any("resume" in b for b in row["buttons"])
    assert browser.execute_script("return window.__stay === 1")  # no reload
    browser.save_screenshot(str(tn.shots / "folders-synced.png"))

    browser.find_element("css selector",
                         '#sync-folders-table tr[data-folder-id="photos"] button.resume').click()
    tn.net.wait_until(lambda: _listed(tn)["photos"]["paused"] is False, WAIT_S,
                      what="resume from the page reaches the node")


def test_add_a_folder_from_the_page(browser: Any, tn: Net) -> None:
    music = tn.root / "Music"
    music.mkdir()
    _open(browser, tn, "folders")
    browser.find_element("id", "folder-add-path").send_keys(str(music))
    browser.find_element("id", "folder-add-id").send_keys("music")
    browser.find_element("id", "folder-add-peers").send_keys("bob")
    browser.find_element("css selector", '#folder-add-mode option[value="receive-only"]').click()
    browser.find_element("css selector", "#folder-add-form button").click()
    _wait(browser, lambda d: "added folder music" in
          d.find_element("id", "folder-add-result").text, "the page says it was added")
    row = _listed(tn)["music"]
    assert (row["path"], row["mode"], row["peer_labels"]) == (
        str(music.resolve()), "receive-only", ["bob"])
    # receive-only: a Revert button (disabled while no engine measures anything)
    row = _wait(browser, lambda d: _folder_rows(d).get("music"), "the new folder is listed")
    assert "secondary revert" in row["buttons"]
    # a refusal is shown in the node's own words
    browser.find_element("id", "folder-add-id").clear()
    browser.find_element("id", "folder-add-id").send_keys("music")
    browser.find_element("css selector", "#folder-add-form button").click()
    _wait(browser, lambda d: "exists already" in d.find_element("id", "error").text,
          "the page shows why the folder was refused")
    # and keeps showing it through the page's own refreshes (every 3 s), which clear only
    # an error a refresh got: under load a refresh used to wipe the answer to the
    # user's action before anyone (this test included) could read it
    for _ in range(2):
        assert browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "refreshPage().then(() => done(true), () => done(false));")
    assert "exists already" in browser.find_element("id", "error").text


def test_a_folder_offer_is_shown_on_the_events_page(browser: Any, tn: Net) -> None:
    """The engine raises folder_offered; here one is handed to the page's renderer as the
    event stream would (the JSON a `node events --json` line carries)."""
    _open(browser, tn, "events")
    b_id = tn.net.peer_id("B").replace("-", "")
    browser.execute_script(
        "addEvent({id: 999999, at_ms: Date.now(), kind: 'folder_offered', "
        "data: {peer_id: arguments[0], folder_id: 'docs', label: 'Team docs'}, "
        "labels: {[arguments[0]]: 'bob'}});", b_id)
    li = _wait(browser, lambda d: next((e for e in d.find_elements(
        "css selector", '#events-list li[data-kind="folder_offered"]')), None),
        "the offer is listed")
    assert "bob offers folder docs (Team docs)" in li.text
    li.find_element("css selector", "button.offer").click()
    _wait(browser, lambda d: d.find_element("id", "page-folders").is_displayed(),
          "the Add button opens the folders page")
    assert browser.find_element("id", "folder-add-id").get_attribute("value") == "docs"
    assert browser.find_element("id", "folder-add-peers").get_attribute("value") == "bob"
