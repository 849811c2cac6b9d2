"""``/docs`` and ``/redoc`` in a real browser with no way out: headless Chromium (Debian's, driven by
its chromedriver) reaches only the loopback interface, yet both pages render every operation of a
gateway started as ``adversa serve`` starts it."""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.openapi.docs import get_swagger_ui_html
from selenium.webdriver import Chrome, ChromeOptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.conftest import free_port, gateway_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
RENDER_TIMEOUT_S = 120
REDOCLY_LOGO = "logo-mini.svg"

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"no {' or '.join(MISSING)}: `make browser` installs Debian's chromium and chromium-driver "
    "(as root; `make test` runs it first)",
)


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway alone (the pages need no worker), as ``adversa serve`` runs it; its base URL."""
    with gateway_process(redis_url, tmp_path_factory.mktemp("var")) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Chrome]:
    """Chromium that reaches nothing but loopback: every host name resolves to nothing, and any
    other request goes to a proxy port where nothing listens (loopback bypasses proxies)."""
    options = ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--disable-extensions", "--no-first-run",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                     f"--proxy-server=http://127.0.0.1:{free_port()}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(RENDER_TIMEOUT_S)
        driver.set_script_timeout(RENDER_TIMEOUT_S)
        try:
            yield driver
        finally:
            driver.quit()


def operations(gateway: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every operation in the served OpenAPI document."""
    document = httpx.get(f"{gateway}/openapi.json", timeout=60).json()
    return [(method, path, operation) for path, item in document["paths"].items()
            for method, operation in item.items()]


def severe(browser: Chrome) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_browser_reaches_no_other_host(browser: Chrome, gateway: str) -> None:
    """The pages below are not green by luck: the CDN that FastAPI's own /docs loads from is out
    of reach for this browser."""
    cdn = inspect.signature(get_swagger_ui_html).parameters["swagger_js_url"].default
    assert cdn.startswith("https://")
    browser.get(f"{gateway}/healthz")
    outcome = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => done('reached'), e => done('failed: ' + e));",
        cdn)
    assert outcome.startswith("failed"), outcome


def test_swagger_ui_renders_every_operation_offline(browser: Chrome, gateway: str) -> None:
    expected = operations(gateway)
    browser.get_log("browser")  # drop what earlier pages left
    browser.get(f"{gateway}/docs")
    wait = WebDriverWait(browser, RENDER_TIMEOUT_S)
    attack = wait.until(lambda b: b.find_elements(
        By.CSS_SELECTOR, '.opblock-post .opblock-summary-path[data-path="/v1/attacks"]'))
    blocks = browser.find_elements(By.CSS_SELECTOR, ".opblock")
    assert len(blocks) == sum(len(operation.get("tags") or ["default"]) for _, _, operation in expected)
    rendered = {(block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.lower(),
                 block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
                for block in blocks}
    assert rendered == {(method, path) for method, path, _ in expected}

    # The attack operation, opened, offers both of its request bodies.
    attack[0].click()
    select = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-section-request-body select"))
    options = [option.get_attribute("value") for option in select[0].find_elements(By.TAG_NAME, "option")]
    assert options == ["application/json", "multipart/form-data"]
    assert severe(browser) == []


def test_redoc_renders_every_operation_offline(browser: Chrome, gateway: str) -> None:
    expected = operations(gateway)
    browser.get_log("browser")
    browser.get(f"{gateway}/redoc")
    selector = '[data-section-id="operation/{}"]'
    attack = next(operation["operationId"] for method, path, operation in expected
                  if (method, path) == ("post", "/v1/attacks"))
    WebDriverWait(browser, RENDER_TIMEOUT_S).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, selector.format(attack)))
    for _, _, operation in expected:
        assert browser.find_elements(By.CSS_SELECTOR, selector.format(operation["operationId"])), operation
    # ReDoc's sidebar always asks Redocly's CDN for its logo and hides it when it does not come;
    # the page's Content-Security-Policy refuses it. Nothing else may fail.
    refused = [entry for entry in severe(browser)
               if not (REDOCLY_LOGO in entry["message"] and "Content Security Policy" in entry["message"])]
    assert refused == []
