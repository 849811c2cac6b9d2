"""The web pages in a real browser: headless Chromium (Debian's, driven by its chromedriver) against a
real gateway process on a real Redis, over a history of audits and jobs. It signs in with a key, opens
the models page, a model's history and a report, then a signed report link with no session; no page
logs a console error (a Content-Security-Policy violation would), every chart lays out. Screenshots
go to ``ADVERSA_UI_SCREENSHOTS`` when set (to look at them), else to the test's temporary directory."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from selenium.common.exceptions import WebDriverException
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from history.store import HistoryStore
from models.store import FileStore
from tests.integration.conftest import gateway_process
from tests.integration.test_report_browser import MISSING, browser  # noqa: F401 - the fixture
from tests.ui_support import audit_result, fill, register_cards

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no {' or '.join(MISSING)}: `make browser` installs "
                                "Debian's chromium and chromium-driver")
KEY = "browser-key"


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway process (no worker: the history is recorded beforehand, as workers would have)."""
    var = tmp_path_factory.mktemp("var")
    history = HistoryStore(f"sqlite:///{var / 'history.db'}")
    register_cards(var / "models", "vision", "vision-cnn", 3)
    fill(history, FileStore(var / "blobs"), "vision", 120, model="vision-cnn", versions=3)
    history.close()
    Redis.from_url(redis_url).flushdb()
    try:
        keys = json.dumps({KEY: "vision", "other-key": "audio"})
        with gateway_process(redis_url, var, {"ADVERSA_API_KEYS": keys}) as base:
            yield base
    finally:
        Redis.from_url(redis_url).flushdb()


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ADVERSA_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def settled(driver: Chrome, title_start: str) -> list[dict[str, Any]]:
    """Wait for the page titled ``title_start...`` to load; its console entries of level SEVERE."""
    deadline = time.monotonic() + 60
    while not (driver.title.startswith(title_start)
               and driver.execute_script("return document.readyState") == "complete"):
        assert time.monotonic() < deadline, f"expected a page titled {title_start!r}, got {driver.title!r}"
        time.sleep(0.1)
    # The report (made by the worker, a standalone file) names no icon: the browser asks for the
    # site's /favicon.ico, which the API does not serve. The pages name an empty inline one.
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
            and not ("/favicon.ico" in entry["message"] and title_start == "Robustness audit")]


def follow(driver: Chrome, element: WebElement) -> None:
    """Click ``element`` and wait until the browser has loaded another document (two pages may share
    a title, so the title alone cannot tell that the next one has loaded). The old document carries a
    mark the next one lacks. While the browser is between documents a script may fail (Chromium has
    answered both "stale element" and "unhandled inspector error"): that counts as not yet there."""
    driver.execute_script("window.adversaOldPage = true")
    element.click()
    WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,)).until(lambda d: d.execute_script(
        "return window.adversaOldPage === undefined && document.readyState === 'complete'"))


def charts(driver: Chrome) -> list[dict[str, float]]:
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll('svg'), s => {const r = s.getBoundingClientRect();"
        " return {width: r.width, height: r.height,"
        " series: s.querySelectorAll('g[id*=\"-series-\"]').length}})"))


def test_sign_in_then_models_history_and_a_report(browser: Chrome, gateway: str, tmp_path: Path) -> None:  # noqa: F811
    folder = shots(tmp_path)
    browser.delete_all_cookies()
    browser.get_log("browser")
    browser.get(f"{gateway}/ui/models")
    assert settled(browser, "Sign in") == []
    assert "/ui/login" in browser.current_url
    browser.find_element(By.NAME, "key").send_keys("not-a-key")
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form button"))
    refused = settled(browser, "Sign in")  # answered 401, which the console reports, and nothing else
    assert [entry["message"] for entry in refused if "401" not in entry["message"]] == []
    assert "Unknown API key" in browser.find_element(By.CSS_SELECTOR, ".error").text
    browser.find_element(By.NAME, "key").send_keys(KEY)
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form button"))
    browser.get_log("browser")

    assert settled(browser, "Models") == []
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script can read it
    row = browser.find_element(By.XPATH, "//tr[td/a[text()='vision-cnn']]").text
    newest = audit_result("vision-cnn", 3)
    assert "v3 · quick" in row and "pass" in row and "vision" in row
    assert f"{newest['robust_accuracy']['linf:0.1']:.1%}" in row
    browser.save_screenshot(str(folder / "ui-models.png"))

    follow(browser, browser.find_element(By.LINK_TEXT, "vision-cnn"))
    assert settled(browser, "vision-cnn") == []
    [chart] = charts(browser)
    assert chart["series"] == 3 and chart["width"] > 300 and chart["height"] > 150
    browser.save_screenshot(str(folder / "ui-model-history.png"))

    follow(browser, browser.find_elements(By.LINK_TEXT, "report")[0])
    assert settled(browser, "Robustness audit") == []
    assert browser.current_url.startswith(f"{gateway}/ui/reports/")  # shown, not downloaded
    assert len(charts(browser)) == 1
    browser.save_screenshot(str(folder / "ui-report.png"))

    browser.get(f"{gateway}/ui/jobs")
    assert settled(browser, "Jobs") == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "tbody tr")) == 50
    browser.save_screenshot(str(folder / "ui-jobs.png"))
    follow(browser, browser.find_element(By.PARTIAL_LINK_TEXT, "older"))
    assert settled(browser, "Jobs") == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "tbody tr")) == 50

    follow(browser, browser.find_element(By.CSS_SELECTOR, "nav form button"))  # sign out: a POST with its token
    assert settled(browser, "Sign in") == []
    browser.get(f"{gateway}/ui/models")
    assert settled(browser, "Sign in") == []


def test_a_signed_link_opens_the_report_in_a_browser_without_a_session(
        browser: Chrome, gateway: str, tmp_path: Path) -> None:  # noqa: F811
    link = httpx.get(f"{gateway}/v1/audits/vision00000/report-link",
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert link.status_code == 200, link.text
    browser.delete_all_cookies()
    browser.get_log("browser")
    browser.get(link.json()["url"])
    assert settled(browser, "Robustness audit") == []
    assert "vision-cnn@1" in browser.find_element(By.TAG_NAME, "h1").text
    browser.save_screenshot(str(shots(tmp_path) / "ui-report-link.png"))
