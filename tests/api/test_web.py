"""The HTTP API (app/api/web.py): auth without existence leaks, limits, caching headers, OpenAPI, dashboard."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from app.api.openapi import OPENAPI_PATH
from app.api.query import MetricsQuery, merge_buckets
from app.api.web import DASHBOARD_CSP, add_admin_routes, make_web_app, token_authorizer
from app.clock import ManualClock
from app.errors import StoreUnavailable
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.backends import token_table
from app.storage.tokens import TokenStore
from tables.aggregate import ROLLUP_RESOLUTIONS
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)

NOW_S = T0 + 7200 + 30
TOKENS = {"tok-shop": "shop", "tok-other": "other"}


async def authorize(token: str) -> str | None:
    return TOKENS.get(token)


def auth(token: str = "tok-shop") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore(ManualClock(NOW_S * 1000))
    minutes = [minute(T0 + 60 * i, np.arange(1.0, 11.0 + i), mc=50) for i in range(120)]
    put_minutes(s, minutes)
    for res in ROLLUP_RESOLUTIONS:  # as agents/rollup.py writes them
        for b, agg in merge_buckets(minutes, res).items():
            s.items[("shop", "web", res, b)] = orjson.dumps(agg.to_record())
    return s


@pytest.fixture
async def client(aiohttp_client: Any, store: MemoryStore) -> TestClient[Any, Any]:
    live = minute(NOW_S - NOW_S % 60, np.arange(1.0, 6.0), mc=50)
    query = MetricsQuery(store, lambda a, p, s, u: [live] if a == "shop" and s <= live.key.start_ms < u else [],
                         settings=SETTINGS, clock=store.clock, counters=Counters())
    c: TestClient[Any, Any] = await aiohttp_client(
        make_web_app(query, SETTINGS.replace(max_query_points=1440), Counters(), authorize=authorize))
    return c


async def test_points_from_store_and_open_minute(client: TestClient[Any, Any]) -> None:
    r = await client.get(f"/v1/apps/shop/metrics?process_type=web&since={NOW_S - 600}&until={NOW_S + 60}",
                         headers=auth())
    assert r.status == 200
    body = await r.json()
    assert (body["app"], body["process_type"], body["resolution_s"]) == ("shop", "web", 60)
    assert [p["ts"] for p in body["points"]][-1] == NOW_S - NOW_S % 60  # the still-open minute
    assert body["points"][-1]["requests"] == 5
    first = body["points"][0]
    assert first["ts"] == NOW_S - NOW_S % 60 - 600
    assert set(first) >= {"requests", "response_ms", "status", "failed", "errors", "memory_mb", "load"}


async def test_resolution_auto_and_explicit(client: TestClient[Any, Any]) -> None:
    since = T0
    for qs, res, n in (("", 600, 13), ("&resolution=1h", 3600, 3), ("&resolution=60", 60, 121),
                       ("&resolution=auto", 600, 13)):
        r = await client.get(f"/v1/apps/shop/metrics?since={since}&until={NOW_S + 60}{qs}", headers=auth())
        body = await r.json()
        assert r.status == 200 and body["resolution_s"] == res, (qs, body)
        assert len(body["points"]) == n, qs
    body = await (await client.get(f"/v1/apps/shop/metrics?since={T0}&until={T0 + 3600}&resolution=10m",
                                   headers=auth())).json()
    assert sum(p["requests"] for p in body["points"]) == sum(10 + i for i in range(60))


async def test_missing_token_is_401_and_wrong_kind_or_unknown_token_too(client: TestClient[Any, Any]) -> None:
    r = await client.get("/v1/apps/shop/metrics")
    assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await client.get("/v1/apps/shop/metrics", headers=auth("nope"))
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_token"
    r = await client.get("/v1/apps/shop/metrics?token=tok-shop")  # query-string tokens are not accepted
    assert r.status == 401


@pytest.mark.parametrize("path", ["/v1/apps/{app}/metrics",
                                  "/v1/apps/{app}/metrics?since=abc",
                                  "/v1/apps/{app}/metrics?resolution=5m",
                                  "/v1/apps/{app}/metrics?since=0&until=2000000000",
                                  "/v1/apps/{app}/metrics?process_type=we%7Cb",
                                  "/v1/apps/{app}/events",
                                  "/v1/apps/{app}/events?since=abc",
                                  "/v1/apps/{app}/events?since=0&until=2000000000"])
async def test_other_apps_token_gets_exactly_the_answer_of_a_missing_app(client: TestClient[Any, Any],
                                                                        path: str) -> None:
    """Token for 'other': 'shop' (exists, has data) and 'ghost' (never existed) are indistinguishable."""
    answers = []
    for app in ("shop", "ghost"):
        r = await client.get(path.format(app=app), headers=auth("tok-other"))
        body = (await r.read()).replace(app.encode(), b"APP")
        answers.append((r.status, r.headers["Content-Type"], body))
    assert answers[0] == answers[1]
    assert answers[0][0] == 404 and b'"not_found"' in answers[0][2]


@pytest.mark.parametrize("qs,code", [
    ("since=abc&until=1", "invalid_range"),
    (f"since={T0}&until={T0}", "invalid_range"),
    (f"since=0&until={T0}", "range_too_large"),
    (f"since={T0 - 31 * 86400}&until={T0}", "range_too_large"),
    (f"since={T0 - 2 * 86400}&until={T0}&resolution=1m", "too_many_points"),
    (f"since={T0}&until={T0 + 60}&resolution=5m", "invalid_resolution"),
    ("process_type=we%7Cb", "invalid_process_type"),
])
async def test_bad_queries_get_400_with_reason(client: TestClient[Any, Any], qs: str, code: str) -> None:
    r = await client.get(f"/v1/apps/shop/metrics?{qs}", headers=auth())
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["code"] == code and err["message"]


async def test_thirty_days_at_auto_resolution_is_allowed(client: TestClient[Any, Any]) -> None:
    r = await client.get(f"/v1/apps/shop/metrics?since={NOW_S - 30 * 86400}&until={NOW_S}", headers=auth())
    body = await r.json()
    assert r.status == 200 and body["resolution_s"] == 7200
    # the final 2 h bucket (rollup item) and the current one (minutes + the open minute, merged now)
    assert [p["requests"] for p in body["points"]] == [sum(10 + i for i in range(120)), 5]


async def test_etag_and_cache_control(client: TestClient[Any, Any]) -> None:
    final = f"/v1/apps/shop/metrics?since={T0}&until={T0 + 3600}"
    r = await client.get(final, headers=auth())
    # Final, yet revalidated: a late minute can still change it (the ETag makes that a 304).
    assert r.status == 200 and r.headers["Cache-Control"] == "private, no-cache"
    assert r.headers["X-Final"] == "true"
    etag = r.headers["ETag"]
    r2 = await client.get(final, headers={**auth(), "If-None-Match": etag})
    assert r2.status == 304 and r2.headers["ETag"] == etag and await r2.read() == b""
    live = await client.get(f"/v1/apps/shop/metrics?since={NOW_S - 600}&until={NOW_S + 60}", headers=auth())
    assert live.headers["Cache-Control"] == "private, no-cache" and live.headers["ETag"] != etag


async def test_store_down_is_503_with_retry_after(aiohttp_client: Any) -> None:
    store = MemoryStore(ManualClock(NOW_S * 1000))
    store.fail_queries = 1
    c = await aiohttp_client(make_web_app(MetricsQuery(store, settings=SETTINGS, clock=store.clock), SETTINGS,
                                          Counters(), authorize=authorize))
    r = await c.get(f"/v1/apps/shop/metrics?since={T0}&until={T0 + 60}", headers=auth())
    assert r.status == 503 and r.headers["Retry-After"] == "2"
    assert (await r.json())["error"]["code"] == "unavailable"


async def test_token_store_down_is_503_not_401(aiohttp_client: Any) -> None:
    async def down(token: str) -> str | None:
        raise StoreUnavailable("tokens table unreachable", retry_after_s=3)

    c = await aiohttp_client(make_web_app(MetricsQuery(MemoryStore(ManualClock(0))), SETTINGS, Counters(),
                                          authorize=down))
    r = await c.get("/v1/apps/shop/metrics", headers=auth())
    assert r.status == 503 and r.headers["Retry-After"] == "3"


async def test_without_a_verifier_every_token_is_refused(aiohttp_client: Any) -> None:
    c = await aiohttp_client(make_web_app(MetricsQuery(MemoryStore(ManualClock(0))), SETTINGS, Counters()))
    assert (await c.get("/v1/apps/shop/metrics", headers=auth())).status == 401


async def test_whoami(client: TestClient[Any, Any]) -> None:
    r = await client.get("/v1/whoami", headers=auth())
    assert r.status == 200 and await r.json() == {"app": "shop", "kind": "read"}
    assert (await client.get("/v1/whoami")).status == 401


async def test_open_endpoints_stay_open(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    r = await client.get("/v1/stats")  # the operator's: on the admin port (test_stats_are_on_the_admin_app)
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.get("/nowhere")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.post("/v1/apps/shop/metrics")
    assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_openapi_document_describes_the_api(client: TestClient[Any, Any]) -> None:
    r = await client.get(OPENAPI_PATH)
    assert r.status == 200
    doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    op = doc["paths"]["/v1/apps/{app}/metrics"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"app", "process_type", "since", "until", "resolution"}
    assert {"200", "304", "400", "401", "404", "503"} <= set(op["responses"])
    ev = doc["paths"]["/v1/apps/{app}/events"]["get"]
    assert {p["name"] for p in ev["parameters"]} == {"app", "process_type", "since", "until"}
    assert {"200", "400", "401", "404", "503"} <= set(ev["responses"]) and ev["security"] == [{"bearer": []}]
    codes = set(doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    import inspect

    import app.api.web as web_module
    used = {c for c in ("unauthorized", "invalid_token", "not_found", "invalid_process_type", "invalid_range",
                        "invalid_resolution", "range_too_large", "too_many_points", "unavailable", "store_error")
            if f'"{c}"' in inspect.getsource(web_module)}
    assert used <= codes and len(used) == 10
    # Operator endpoints are on the admin port (security review M2), not in the tenants' document.
    assert not {"/v1/stats", "/metrics", "/migration", "/readyz"} & set(doc["paths"])
    for path in doc["paths"]:  # every documented path is routed
        r = await client.get(path.replace("{app}", "shop"), headers=auth())
        assert r.status in (200, 400), path


async def test_dashboard_and_vendored_chart_library_are_served(client: TestClient[Any, Any]) -> None:
    r = await client.get("/dashboard", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/dashboard/"
    page = await client.get("/dashboard/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert "vendor/uPlot.iife.min.js" in html and "dashboard.js" in html and "cdn" not in html.lower()
    for path in ("/dashboard/dashboard.js", "/dashboard/dashboard.css", "/dashboard/vendor/uPlot.iife.min.js",
                 "/dashboard/vendor/uPlot.min.css"):
        r = await client.get(path)
        assert r.status == 200 and len(await r.read()) > 100, f"{path}: run `make install` (npm pack uplot)"
    assert (await client.get("/dashboard/vendor/..%2Fpackage.json")).status == 404
    assert (await client.get("/dashboard/secret.py")).status == 404


async def test_dashboard_sends_security_headers_and_api_answers_are_not_sniffed(
        client: TestClient[Any, Any]) -> None:
    """M9: the dashboard's pages and files carry the CSP, nosniff and no Referer; JSON answers nosniff."""
    for path in ("/dashboard/", "/dashboard/dashboard.js", "/dashboard/dashboard.css",
                 "/dashboard/vendor/uPlot.iife.min.js", "/dashboard/nothing.html"):
        r = await client.get(path)
        assert r.headers["Content-Security-Policy"] == DASHBOARD_CSP, path
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
    r = await client.get("/dashboard", allow_redirects=False)
    assert r.status == 302 and r.headers["Content-Security-Policy"] == DASHBOARD_CSP
    for path, headers in ((f"/v1/apps/shop/metrics?since={T0}&until={T0 + 600}", auth()), ("/v1/whoami", {}),
                          (OPENAPI_PATH, {}), ("/healthz", {}), ("/nowhere", {})):
        r = await client.get(path, headers=headers)
        assert r.content_type == "application/json" and r.headers["X-Content-Type-Options"] == "nosniff", path
    # The page needs nothing the CSP refuses: no inline script or style, no other origin.
    from app.api.web import DASHBOARD_DIR
    for name in ("index.html", "migration.html"):
        html = (DASHBOARD_DIR / name).read_text()
        assert "<style" not in html and " style=" not in html and "javascript:" not in html
        assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html)), name
        assert "http://" not in html and "https://" not in html


async def test_migration_page_and_stats_are_on_the_admin_app_only(client: TestClient[Any, Any]) -> None:
    for path in ("/dashboard/migration.html", "/dashboard/migration.js"):
        assert (await client.get(path)).status == 404
    admin = web.Application()
    counters = Counters()
    add_admin_routes(admin, SETTINGS, counters)
    c = TestClient(TestServer(admin))
    await c.start_server()
    try:
        body = await (await c.get("/v1/stats")).json()
        assert set(body["counters"]) == set(body["help"])
        page = await c.get("/dashboard/migration.html")
        assert page.status == 200 and page.headers["Content-Security-Policy"] == DASHBOARD_CSP
        assert (await c.get("/dashboard/migration.js")).status == 200
        assert (await c.get("/dashboard/index.html")).status == 404  # no tenant dashboard there
    finally:
        await c.close()


async def test_missing_chart_library_says_how_to_install(aiohttp_client: Any, tmp_path: Any) -> None:
    c = await aiohttp_client(make_web_app(MetricsQuery(MemoryStore(ManualClock(0))),
                                          SETTINGS.replace(dashboard_assets_dir=str(tmp_path)), Counters()))
    r = await c.get("/dashboard/vendor/uPlot.iife.min.js")
    assert r.status == 404 and "make install" in (await r.json())["error"]["message"]


@pytest.fixture
async def token_store(aws: None) -> AsyncIterator[TokenStore]:  # noqa: F811
    settings = Settings.of(table_name=f"t-{uuid.uuid4().hex[:10]}", dynamodb_endpoint="")
    s = TokenStore(settings.web, table=token_table(settings))
    await s.start()
    yield s
    await s.stop()


async def test_token_store_wiring_accepts_read_tokens_of_the_app_only(aiohttp_client: Any,
                                                                      token_store: TokenStore) -> None:
    read, _ = await token_store.create("shop", "read")
    write, _ = await token_store.create("shop", "write")
    other, _ = await token_store.create("other", "read")
    store = MemoryStore(ManualClock(NOW_S * 1000))
    c = await aiohttp_client(make_web_app(MetricsQuery(store, settings=SETTINGS, clock=store.clock), SETTINGS,
                                          Counters(), authorize=token_authorizer(token_store)))
    q = f"/v1/apps/shop/metrics?since={T0}&until={T0 + 60}"
    assert (await c.get(q, headers=auth(read))).status == 200
    assert (await c.get(q, headers=auth(write))).status == 401
    assert (await c.get(q, headers=auth(other))).status == 404


async def test_events_endpoint_serves_stored_events_with_the_same_auth_rules(client: TestClient[Any, Any],
                                                                             store: MemoryStore) -> None:
    from agents.events import ALERT, AUTOSCALE, EventsJob
    from tests.agents.test_events import alert, decision

    await EventsJob(store, SETTINGS.storage, Counters()).write(
        [(ALERT, alert(NOW_S - 600)), (AUTOSCALE, decision(NOW_S - 300, 2, 3)),
         (ALERT, alert(NOW_S - 7000))], now_s=NOW_S)
    r = await client.get(f"/v1/apps/shop/events?process_type=web&since={NOW_S - 3600}&until={NOW_S}",
                         headers=auth())
    assert r.status == 200 and r.headers["Cache-Control"] == "private, no-cache"
    body = await r.json()
    assert [(e["kind"], e["ts"]) for e in body["events"]] == [("alert", bucket(NOW_S - 600)),
                                                              ("autoscale", bucket(NOW_S - 300))]
    assert (await client.get("/v1/apps/shop/events")).status == 401
    assert (await client.get("/v1/apps/shop/events", headers=auth("nope"))).status == 401
    r = await client.get(f"/v1/apps/shop/events?since={NOW_S}&until={NOW_S}", headers=auth())
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_range"
    r = await client.get("/v1/apps/shop/events?process_type=we%7Cb", headers=auth())
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_process_type"
    r = await client.get("/v1/apps/shop/events?process_type=worker", headers=auth())  # none: an empty list
    assert r.status == 200 and (await r.json())["events"] == []


def bucket(ts: int) -> int:
    return ts - ts % 60


async def test_events_store_down_is_503(aiohttp_client: Any) -> None:
    store = MemoryStore(ManualClock(NOW_S * 1000))
    store.fail_queries = 1
    c = await aiohttp_client(make_web_app(MetricsQuery(store, settings=SETTINGS, clock=store.clock), SETTINGS,
                                          Counters(), authorize=authorize))
    r = await c.get("/v1/apps/shop/events", headers=auth())
    assert r.status == 503 and r.headers["Retry-After"] == "2"


async def test_a_store_slower_than_the_query_timeout_answers_503_at_once(aiohttp_client: Any) -> None:
    """A store that does not answer (down, its client retrying with backoff) costs a request at most
    METRICS_QUERY_TIMEOUT_S, then 503 with Retry-After; the token check is bounded the same way."""
    import asyncio
    import time

    class Hanging(MemoryStore):
        async def query(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(30)
            return []

    async def slow_authorize(token: str) -> str | None:
        if token == "slow":
            await asyncio.sleep(30)
        return await authorize(token)

    store = Hanging(ManualClock(NOW_S * 1000))
    settings = SETTINGS.replace(query_timeout_s=0.3)
    c = await aiohttp_client(make_web_app(MetricsQuery(store, settings=settings, clock=store.clock), settings,
                                          Counters(), authorize=slow_authorize))
    for path, token in ((f"/v1/apps/shop/metrics?since={T0}&until={T0 + 600}", "tok-shop"),
                        ("/v1/apps/shop/events", "tok-shop"), ("/v1/whoami", "slow")):
        t0 = time.monotonic()
        r = await c.get(path, headers=auth(token))
        assert r.status == 503 and r.headers["Retry-After"] == "2", path
        assert (await r.json())["error"]["code"] == "timeout"
        assert time.monotonic() - t0 < 2, path


async def test_since_and_until_beyond_any_epoch_are_a_400_not_a_500(client: TestClient[Any, Any]) -> None:
    """Found by schemathesis: 2**70 passed the range checks and then could not be written as JSON (500)."""
    for path in ("metrics", "events"):
        for qs in (f"since={2**70}&until={2**70 + 60}", "since=-5&until=60", f"until={10**12}"):
            r = await client.get(f"/v1/apps/shop/{path}?{qs}", headers=auth())
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_range", (path, qs)
