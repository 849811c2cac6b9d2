"""The audit report page in a real browser: headless Chromium (Debian's, driven by its chromedriver)
loads it from a file with no console errors, decodes every image and lays out every chart."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver import Chrome, ChromeOptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.unit.test_report import CLASSES, full_result, sample_images
from workers.audit.report import render_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {' or '.join(MISSING)}: `make browser` installs Debian's chromium and chromium-driver "
    "(as root; `make test` runs it first)",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Chrome]:
    options = ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def load(browser: Chrome, page: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Open ``page`` from a file; the browser's log entries from loading it."""
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    browser.get_log("browser")  # drop what earlier pages left
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    return list(browser.get_log("browser"))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_report_loads_cleanly_with_every_image_and_chart(
    browser: Chrome, tmp_path: Path, channels: int
) -> None:
    k = 5
    result = full_result()
    log = load(browser, render_report(result, sample_images(k=k, channels=channels), CLASSES), tmp_path)

    assert [entry for entry in log if entry["level"] == "SEVERE"] == []
    assert browser.title.startswith("Robustness audit")
    images = browser.execute_script(
        "return Array.from(document.images, i => ({complete: i.complete, width: i.naturalWidth,"
        " height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
    )
    assert len(images) == 3 * k
    for image in images:
        assert image["complete"] is True and image["width"] == 84 and image["height"] == 84
        assert image["shown"] > 0
    charts = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg'), s => {const r = s.getBoundingClientRect();"
        " return {width: r.width, height: r.height, lines: s.querySelectorAll('g[id*=\"-series-\"]').length}})"
    )
    assert [chart["lines"] for chart in charts] == [len(c["attacks"]) + 1 for c in result["curves"].values()]
    for chart in charts:
        assert chart["width"] > 0 and chart["height"] > 0
    line_widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('g[id*=\"-series-\"] > path'), p => p.getBBox().width)"
    )
    assert line_widths and all(width > 0 for width in line_widths)
    # The hostile class name stayed text: no element was made from it.
    assert browser.execute_script("return document.scripts.length") == 0
    assert "<script>alert(1)</script>" in browser.find_element(By.CSS_SELECTOR, "#sample-images").text


def test_a_partial_report_loads_cleanly(browser: Chrome, tmp_path: Path) -> None:
    log = load(browser, render_report({"model": "fmnist-cnn@1"}, None, CLASSES), tmp_path)
    assert [entry for entry in log if entry["level"] == "SEVERE"] == []
    assert browser.execute_script("return document.images.length") == 0
    assert "Not run." in browser.find_element(By.CSS_SELECTOR, "#robust-accuracy").text


def test_the_console_check_would_see_an_error(browser: Chrome, tmp_path: Path) -> None:
    """The test above is not vacuous: an error on the page does reach the log at level SEVERE."""
    broken = render_report({"model": "m"}, None, []).replace(
        "</main>", '<img src="data:image/png;base64,bm90IGEgcG5n" alt="broken"></main>'
    ).replace("</body>", "<script>undefinedFunction()</script></body>")
    log = load(browser, broken, tmp_path)
    assert any(entry["level"] == "SEVERE" and "undefinedFunction" in entry["message"] for entry in log)
    assert browser.execute_script("return document.images[0].naturalWidth") == 0
