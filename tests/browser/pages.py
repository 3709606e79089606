"""What every dashboard browser test does: wait on the page, and show one of its pages.

Imported by the tests in this directory (selenium is imported only when called, so a
machine without it still collects and skips them, as conftest.py decides).
"""

from __future__ import annotations

from typing import Any

WAIT_S = 20.0


def wait_for(browser: Any, condition: Any, what: str) -> Any:
    """Wait for `condition(browser)` to be truthy; a row the page re-rendered under the
    condition (a stale element) counts as "not yet"."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_S, poll_frequency=0.1,
                         ignored_exceptions=[StaleElementReferenceException]
                         ).until(condition, message=what)


def show_page(browser: Any, url: str, base: str, page: str) -> None:
    """Show `page` of the dashboard at `url` (with its token; loaded unless the browser is
    on `base` already), setting the no-reload marker `window.__stay`."""
    if not browser.current_url.startswith(base):
        browser.get(url)
        wait_for(browser, lambda d: "·" in d.find_element("id", "node-name").text,
                 "the page loaded its session")
    browser.execute_script(f"location.hash = '#{page}'; window.__stay = 1;")
    wait_for(browser, lambda d: d.find_element("id", f"page-{page}").is_displayed(),
             f"the {page} page is shown")
