"""The dashboard in a real headless Chromium (Debian chromium + chromedriver, driven by selenium), on data
that went through the whole pipeline. A screenshot is kept in artifacts/dashboard.png."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from app.embedded import EmbeddedBroker, EmbeddedDynamo
from tests.integration.pipeline import ARTIFACTS
from tests.integration.test_query_api import Served, start_served

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHARTS = ("response", "throughput", "errors", "memory", "load")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1900")

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Debian chromium/chromium-driver are not installed (`make browser` installs them as root: "
                "apt-get install chromium chromium-driver); the dashboard cannot be tested without a browser",
                allow_module_level=True)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, dynamo: EmbeddedDynamo,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = start_served(broker, dynamo, tmp_path_factory.mktemp("dashboard"))
    try:
        yield s
    finally:
        s.pipeline.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


PLOTTED = """
const out = {};
for (const name of arguments[0]) {
  const u = window.dashboard.charts[name];
  out[name] = u ? u.data.slice(1).reduce((n, ys) => n + ys.filter((v) => v !== null).length, 0) : 0;
}
return out;
"""


def submit_token(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "show").click()


def test_dashboard_plots_pipeline_data_refetches_on_range_switch_and_explains_bad_tokens(
        served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(served.pipeline.url + "/dashboard/")
    assert browser.execute_script("return typeof uPlot") == "function"  # served locally, not from a CDN

    submit_token(browser, "mk_read_not-a-real-token")
    error = wait_for(lambda: browser.find_element(By.ID, "error").is_displayed()
                     and browser.find_element(By.ID, "error").text, 10, "the bad-token message")
    assert "token was refused" in error and "read token" in error

    submit_token(browser, served.tokens["app-0"])
    wait_for(lambda: browser.execute_script("return window.dashboard.last !== null"), 20, "the first answer")
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "app").get_attribute("value") == "app-0"
    last = browser.execute_script("return window.dashboard.last")
    assert last["resolution_s"] == 600 and last["points"]  # default range: 24 h at 10 min
    plotted = browser.execute_script(PLOTTED, list(CHARTS))
    assert all(plotted[c] > 0 for c in CHARTS), plotted
    labels = browser.execute_script(
        "return window.dashboard.charts.throughput.series.slice(1).map((s) => s.label)")
    assert "failed (≥500)" in labels
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    fetches = browser.execute_script("return window.dashboard.fetches")
    Select(browser.find_element(By.ID, "range")).select_by_value("7200")
    wait_for(lambda: browser.execute_script("return window.dashboard.last.resolution_s") == 60, 20,
             "the 2 h range at 1 min resolution")
    assert browser.execute_script("return window.dashboard.fetches") == fetches + 1
    plotted = browser.execute_script(PLOTTED, list(CHARTS))
    assert all(plotted[c] > 0 for c in CHARTS), plotted
    browser.save_screenshot(str(Path(ARTIFACTS / "dashboard-2h.png")))
