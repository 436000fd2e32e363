"""Our own OpenAPI document against our own server, by a property-based client (schemathesis): every
operation, with generated parameters and bodies, without a token, with the app's token and with another
app's. No answer may be a 5xx, and every answer must conform to the document (status code, content type,
body schema). The server is the worker's read API with the monitors and autoscaling routes, on a real
loopback socket, over an in-memory store."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis import checks

from app.api.openapi import document, with_policy_routes
from app.api.policies import add_policy_routes
from app.api.query import MetricsQuery, merge_buckets
from app.api.web import OPENAPI_KEY, make_web_app
from app.local.embedded import free_port
from app.ops.stats import Counters
from tables.aggregate import ROLLUP_RESOLUTIONS
from tests.api.test_policies import Worker
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes
from tests.api.test_web import NOW_S

READ = {"rd-shop": "shop", "rd-other": "other"}
WRITE = {"wr-shop": "shop"}
TOKENS = {"none": None, "shop": "rd-shop", "other": "rd-other", "write": "wr-shop"}


async def authorize(token: str) -> str | None:
    return READ.get(token)


async def authorize_policies(request: web.Request, app: str) -> bool:
    from app.storage.tokens import bearer

    token = bearer(request.headers, {})
    table = READ if request.method in ("GET", "HEAD") else WRITE
    return token is not None and table.get(token) == app


def build_app() -> web.Application:
    from app.clock import ManualClock

    store = MemoryStore(ManualClock(NOW_S * 1000))
    minutes = [minute(T0 + 60 * i, np.arange(1.0, 11.0 + i), mc=50) for i in range(120)]
    put_minutes(store, minutes)
    for res in ROLLUP_RESOLUTIONS:
        for b, agg in merge_buckets(minutes, res).items():
            store.items[("shop", "web", res, b)] = orjson.dumps(agg.to_record())
    query = MetricsQuery(store, settings=SETTINGS, clock=store.clock, counters=Counters())
    worker = Worker()
    webapp = make_web_app(query, SETTINGS.replace(max_query_points=1440), Counters(),
                          lambda w: add_policy_routes(w, worker.backend(1.0), authorize=authorize_policies),
                          authorize=authorize)
    webapp[OPENAPI_KEY] = orjson.dumps(with_policy_routes(document(SETTINGS)))
    return webapp


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The app on a loopback port, served by its own event loop in a thread (the client is synchronous)."""
    loop = asyncio.new_event_loop()
    port = free_port()
    runner = web.AppRunner(build_app())

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


schema = schemathesis.openapi.from_dict(with_policy_routes(document(SETTINGS)))
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance, checks.ignored_auth]
"""Not ``positive_data_acceptance``: a range over the retention, or more points than the limit, is a 400 the
document cannot express (a constraint between two parameters); docs/api.md and the 400's message say it.
Not ``negative_data_rejection``: unknown query parameters are ignored on purpose, as most HTTP APIs do."""


@schema.parametrize()
@settings(max_examples=300 if os.environ.get("MINUTELY_CHAOS") else 25, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_and_never_answers_5xx(case: Any, base_url: str) -> None:
    for who, token in TOKENS.items():
        for app in (None, "shop"):  # as generated (mostly unknown apps), and the token's own app
            if app is not None and "app" in (case.path_parameters or {}):
                case.path_parameters = {**case.path_parameters, "app": app}
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = case.call(base_url=base_url, headers=headers, timeout=10)
            assert response.status_code < 500, (who, case.method, case.formatted_path, response.text[:300])
            case.validate_response(response, checks=CHECKS, headers=headers)
