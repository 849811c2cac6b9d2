"""The audit report page in a real browser: headless Chromium (Debian's, driven by its chromedriver)
loads it from a file with no console errors, decodes every image and lays out every chart. The
pages are real merge output (``tests.unit.real_audits``: the quick audit of a tiny model, one and
three channels), as the merge job stored them, and re-rendered with class names chosen to break
unescaped HTML."""

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

from tests.unit.real_audits import real_audit
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


HOSTILE = ("<script>alert(1)</script>", "<img src=x onerror=alert(2)>", 'coat "long" & warm',
           "</figcaption><b>bold</b>")


@pytest.mark.parametrize("model", ["tiny-net", "tiny-rgb"])  # 1 x 6 x 6 and 3 x 6 x 6 inputs
def test_the_report_loads_cleanly_with_every_image_and_chart(browser: Chrome, tmp_path: Path,
                                                            model: str) -> None:
    audit = real_audit("quick", "linf", model=model)
    assert audit.samples is not None
    k = audit.samples.x.shape[0]
    log = load(browser, audit.report, tmp_path)

    assert [entry for entry in log if entry["level"] == "SEVERE"] == []
    assert browser.title == f"Robustness audit — {model}@1"
    images = browser.execute_script(
        "return Array.from(document.images, i => ({complete: i.complete, width: i.naturalWidth,"
        " height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
    )
    assert k >= 1 and len(images) == 3 * k
    for image in images:  # 6 x 6 pictures, upscaled 14 times
        assert image["complete"] is True and image["width"] == 84 and image["height"] == 84
        assert image["shown"] > 0
    charts = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg'), s => {const r = s.getBoundingClientRect();"
        " return {width: r.width, height: r.height, lines: s.querySelectorAll('g[id*=\"-series-\"]').length}})"
    )
    curves = audit.result["curves"]
    assert [chart["lines"] for chart in charts] == [len(c["attacks"]) + 1 for c in curves.values()] == [3]
    for chart in charts:
        assert chart["width"] > 0 and chart["height"] > 0
    line_widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('g[id*=\"-series-\"] > path'), p => p.getBBox().width)"
    )
    assert line_widths and all(width > 0 for width in line_widths)
    assert browser.execute_script("return document.scripts.length") == 0


def test_class_names_from_the_data_stay_text(browser: Chrome, tmp_path: Path) -> None:
    audit = real_audit("quick", "linf")
    log = load(browser, render_report(audit.result, audit.samples, HOSTILE), tmp_path)
    assert [entry for entry in log if entry["level"] == "SEVERE"] == []
    # No element was made from a class name: no script, no extra image, no bold text.
    assert browser.execute_script("return document.scripts.length") == 0
    assert audit.samples is not None
    assert browser.execute_script("return document.images.length") == 3 * audit.samples.x.shape[0]
    assert browser.execute_script("return document.querySelectorAll('b').length") == 0
    shown = browser.find_element(By.CSS_SELECTOR, "#sample-images").text
    named = {HOSTILE[int(label)] for label in audit.samples.labels}
    assert named and all(name in shown for name in named)


def test_a_partial_report_loads_cleanly(browser: Chrome, tmp_path: Path) -> None:
    log = load(browser, render_report({"model": "fmnist-cnn@1"}, None, HOSTILE), tmp_path)
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
