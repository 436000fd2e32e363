"""The dashboard in a real headless Chromium (Debian chromium + chromedriver, driven by selenium), on data
that went through the whole pipeline. A screenshot is kept in artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from app.local.traffic import produce
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
def served(broker: KafkaBroker, dynamo: DynamoServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    uid = uuid.uuid4().hex[:8]
    s = start_served(broker, dynamo, tmp_path_factory.mktemp("dashboard"), realistic=True,
                     METRICS_ALERTS_TOPIC=f"alerts-{uid}", METRICS_AUTOSCALE_TOPIC=f"autoscale-{uid}")
    try:
        publish_events(broker, s)
        publish_language_metrics(broker, s)
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
    # CSP violations, failed requests and script errors are reported on the console (read with get_log).
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def publish_events(broker: KafkaBroker, s: Served) -> None:
    """Alert transitions and a scaling step for app-0, in the records' published format (app/alerting
    AlertEvent / Decision .to_record), on the worker's own topics; waits until the events job stored them."""
    settings = s.pipeline.settings
    fire_ms, resolve_ms, scale_ms = ((s.start_s + m * 60) * 1000 for m in (3, 9, 5))
    alerts = [{"event_id": f"app-0/mon_t/{ms}/{ev}", "event": ev, "app": "app-0", "process_type": "web",
               "monitor_id": "mon_t", "metric": "LATENCY", "minute_start_ms": ms, "value": 900.0, "requests": 300,
               "threshold": 500.0, "sensitivity_min": 1, "firing_since_ms": fire_ms}
              for ms, ev in ((fire_ms, "firing"), (resolve_ms, "resolved"))]
    decision = {"event_id": f"app-0/web/{scale_ms}/autoscale", "app": "app-0", "process_type": "web",
                "minute_start_ms": scale_ms, "action": "up", "from_dynos": 2, "to_dynos": 3,
                "reason": "p95 over target", "requests": 300, "p95_ms": 900.0, "p95_target_ms": 500.0,
                "capacity_per_dyno": 100.0, "needed_dynos": 3, "min_dynos": 1, "max_dynos": 5,
                "pinned_at_max": False}
    asyncio.run(produce(broker.address, settings.kafka.alerts_topic, [(b"app-0", orjson.dumps(a)) for a in alerts]))
    asyncio.run(produce(broker.address, settings.kafka.autoscale_topic, [(b"app-0", orjson.dumps(decision))]))
    s.pipeline.wait_stats(lambda st: st["events_stored"] >= 3, 60, "alert/autoscale events stored")


LANGUAGE = {"go.memory.heap.bytes": ("gauge", 52_428_800.0), "go.gc.goal": ("gauge", 104_857_600.0),
            "go.routines": ("gauge", 40.0), "go.gc.collections": ("counter", 3.0), "go.gc.pause.ns": ("counter", 9e5)}
"""What heroku/x hmetrics reports, as the language-metrics endpoint turns it into observations."""


def publish_language_metrics(broker: KafkaBroker, s: Served) -> None:
    """Three reports of a Go dyno of app-0 in the current minute; waits until the worker stored them."""
    settings = s.pipeline.settings
    now_ms = int(time.time() * 1000)
    before = s.pipeline.stats()
    obs = [{"kind": "metric", "app": "app-0", "dyno": "web.1", "ts": now_ms - 1000 * i, "name": name, "type": kind,
            "value": v} for i in range(3) for name, (kind, v) in LANGUAGE.items()]
    asyncio.run(produce(broker.address, settings.kafka.observations_topic, [(b"app-0", orjson.dumps(obs))]))
    s.pipeline.wait_stats(lambda st: st["observations_accepted"] >= before["observations_accepted"] + len(obs)
                          and st["sink_items_written"] > before["sink_items_written"], 60,
                          "the language metrics stored")


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
    # The console so far: the refused token's 401s and nothing else (no favicon 404, no script error).
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("status of 401" in m for m in severe), severe

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
    # Alert transitions on the response-time chart, the scaling step on the dyno-load chart, drawn on the canvas;
    # platform events next to them: the release on every chart, R14s (memory over quota) on the memory chart.
    drawn = browser.execute_script("return window.dashboard.drawn")
    assert drawn["response"][:2] == ["▲ p95 firing", "▼ p95 resolved"], drawn
    assert drawn["load"][0] == "dynos 2→3", drawn
    for chart in CHARTS:
        assert drawn[chart].count("release") == 1, (chart, drawn)
    truth = served.gen.truth
    assert truth is not None
    r14_buckets = {k[2] // 600_000 for k, v in truth.platform.items() if k[:2] == ("app-0", "web") and v.get("R14")}
    memory_r14 = [m for m in drawn["memory"] if m.startswith("R14")]
    assert r14_buckets and len(memory_r14) == len(r14_buckets), (r14_buckets, drawn["memory"])
    assert sum(int(m.split("×")[1]) if "×" in m else 1 for m in memory_r14) == sum(  # noqa: RUF001  the dashboard's multiplication sign
        v.get("R14", 0) for k, v in truth.platform.items() if k[:2] == ("app-0", "web"))
    # Add-on metrics (process type `app`): one chart per source and kind of sample, with data.
    addons = browser.execute_script("return window.dashboard.addons")
    assert addons == ["DATABASE · sizes (MB)", "DATABASE · load", "DATABASE · connections", "DATABASE · ratios",
                      "DATABASE · other"], addons
    plotted = browser.execute_script(PLOTTED, [f"addon-0-{g}" for g in range(5)])
    assert all(n > 0 for n in plotted.values()), plotted
    # Language runtime metrics (hmetrics' names): one chart per kind, with data.
    languages = browser.execute_script("return window.dashboard.languages")
    assert languages == ["Go · memory (MB)", "Go · GC", "Go · goroutines and threads"], languages
    plotted = browser.execute_script(PLOTTED, ["lang-0-0", "lang-0-1", "lang-0-2"])
    assert all(n > 0 for n in plotted.values()), plotted
    heap = browser.execute_script("return window.dashboard.charts['lang-0-0'].data")
    assert 50.0 in heap[1] + heap[2], heap  # go.gc.goal and go.memory.heap.bytes, in MB
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    fetches = browser.execute_script("return window.dashboard.fetches")
    Select(browser.find_element(By.ID, "range")).select_by_value("7200")
    wait_for(lambda: browser.execute_script("return window.dashboard.last.resolution_s") == 60, 20,
             "the 2 h range at 1 min resolution")
    assert browser.execute_script("return window.dashboard.fetches") == fetches + 3  # metrics, events, app-wide
    plotted = browser.execute_script(PLOTTED, list(CHARTS))
    assert all(plotted[c] > 0 for c in CHARTS), plotted
    browser.save_screenshot(str(Path(ARTIFACTS / "dashboard-2h.png")))
    # All of it under the dashboard's CSP (security review M9), which refused nothing the page needs.
    csp = browser.execute_async_script(
        "const done = arguments[0]; fetch('/dashboard/').then((r) => done(r.headers.get('content-security-policy')))")
    assert csp == "default-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"
    console = browser.get_log("browser")
    refused = [e["message"] for e in console if "Content Security Policy" in e["message"]]
    assert refused == []
    # With a good token the page logs no error at all: no failed request, no script error.
    assert [e["message"] for e in console if e["level"] == "SEVERE"] == []
