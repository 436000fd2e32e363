"""The Grafana dashboard (helm/minutely/dashboards/minutely.json) against the real Prometheus HTTP API, and the
ConfigMap that hands it to Grafana's dashboard sidecar (helm/minutely/templates/grafana-dashboard.yaml).

Every query of the dashboard is sent, with its variables interpolated as Grafana does, to the API over the stock
of tests/api/test_prometheus_http.py: a panel whose query the API refuses, or that names a label the answer does
not have, would be an empty chart in Grafana."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import kubernetes_validate
import orjson
import promql_parser
import pytest
from aiohttp.test_utils import TestClient

from app.api.prometheus.http import add_prometheus_routes
from app.api.prometheus.model import METRICS
from app.api.query import MetricsQuery
from app.api.web import make_web_app
from app.clock import ManualClock
from app.ops.stats import Counters
from tables.aggregate import Aggregate
from tests.api.test_prometheus_http import NOW_S, auth, authorize, stocked
from tests.api.test_query import SETTINGS, T0, MemoryStore
from tests.test_deploy import CHART, NAMESPACE, RELEASE, Doc, find, one, render

DASHBOARD_FILE = CHART / "dashboards" / "minutely.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
CONFIGMAP = f"{RELEASE}-minutely-grafana-dashboard"
PROMETHEUS_DS = {"type": "prometheus", "uid": "${datasource}"}
WINDOW = {"start": T0, "end": T0 + 3600}
EVENTS = (("shop", "web", T0 + 1800, "release"), ("shop", "worker", T0 + 600, "restart"))
"""Platform events added to the stock (it has none), so the events panel and annotation have something to show."""
PROCESS_TYPES = ("web|worker", "(web|worker)")
"""``$process_type`` with both selected: as the brief writes it, and as Grafana's Prometheus data source
interpolates a multi-value variable (a regex group of the escaped values)."""


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def queries() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) of every PromQL query: the panels' targets and the annotations."""
    out = [(f"{p['title']}/{t['refId']}", t["expr"], t.get("legendFormat", ""))
           for p in DASHBOARD["panels"] for t in p["targets"]]
    out += [(f"annotation {a['name']}", a["expr"], a.get("titleFormat", ""))
            for a in DASHBOARD["annotations"]["list"] if "expr" in a]
    assert len(out) == sum(1 for d in walk(DASHBOARD) if "expr" in d)  # none elsewhere, none missed
    return out


def interpolate(text: str, process_type: str) -> str:
    for name, value in (("app", "shop"), ("process_type", process_type)):
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in text, f"an unknown variable in {text!r}"
    return text


def variable(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in DASHBOARD["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def with_events(store: MemoryStore) -> MemoryStore:
    """EVENTS into the stock's minute items and the rollup items that hold their minute, as the jobs would."""
    for (app, proc, res, start), payload in list(store.items.items()):
        agg = Aggregate.from_record(orjson.loads(payload))
        hits = [name for a, p, ts, name in EVENTS if (a, p) == (app, proc) and start <= ts < start + res]
        for name in hits:
            agg.add_event(name)
        if hits:
            store.items[(app, proc, res, start)] = orjson.dumps(agg.to_record())
    return store


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient[Any, Any]:
    """tests/api/test_prometheus_http.py's client over its stock, plus EVENTS."""
    clock = ManualClock(NOW_S * 1000)
    counters = Counters()
    query = MetricsQuery(with_events(stocked(clock)), settings=SETTINGS, clock=clock, counters=counters)
    webapp = make_web_app(query, SETTINGS, counters, authorize=authorize, clock=clock,
                          extra=add_prometheus_routes)
    c: TestClient[Any, Any] = await aiohttp_client(webapp)
    return c


def test_the_dashboard_charts_what_the_built_in_one_does_through_the_chosen_data_source() -> None:
    assert (DASHBOARD["uid"], DASHBOARD["title"], DASHBOARD["schemaVersion"]) == ("minutely-app", "minutely: app", 39)
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == PROMETHEUS_DS, panel["title"]
        assert [t["datasource"] for t in panel["targets"]] == [PROMETHEUS_DS] * len(panel["targets"])
    for a in DASHBOARD["annotations"]["list"]:
        assert a["datasource"] == (PROMETHEUS_DS if "expr" in a else {"type": "grafana", "uid": "-- Grafana --"})
    ds = variable("datasource")
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    assert variable("app")["datasource"] == variable("process_type")["datasource"] == PROMETHEUS_DS
    assert not variable("app")["multi"] and variable("process_type")["multi"]
    # The built-in dashboard's charts (app/api/dashboard/dashboard.js: response, throughput with failed,
    # errors, memory with quota, load; platform events as markers), by the documented metric names.
    named = {m for _, expr, _ in queries() for m in re.findall(r"\bminutely_\w+", expr)}
    assert named <= METRICS.keys()
    assert named == {"minutely_response_time_ms", "minutely_requests", "minutely_failed_requests",
                     "minutely_router_errors", "minutely_platform_events", "minutely_memory_mb",
                     "minutely_memory_quota_mb", "minutely_load"}
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in DASHBOARD["panels"]}
    assert units["Throughput (requests / min)"] == "reqpm" and units["Response time (ms)"] == "ms"
    legends = [t["legendFormat"] for p in DASHBOARD["panels"] if p["title"] == "Response time (ms)"
               for t in p["targets"]]
    assert [s.split()[0] for s in legends] == ["p50", "p95", "p99", "max"]
    for _, expr, _ in queries():
        # Only what docs/prometheus.md lists as supported; each selector is confined to the chosen app and
        # process types (a multi-value variable needs =~).
        assert not re.search(r"\b(rate|irate|increase|group_left|group_right)\b|:\w*\]", expr), expr
        for sel in re.findall(r"\bminutely_\w+\{([^}]*)\}", expr):
            assert sel.startswith('app="$app",process_type=~"$process_type"'), expr


@pytest.mark.parametrize("process_type", PROCESS_TYPES)
@pytest.mark.parametrize(("where", "expr", "legend"), queries(), ids=[q[0] for q in queries()])
async def test_every_query_is_answered_with_data_and_the_labels_its_legend_names(
        client: TestClient[Any, Any], where: str, expr: str, legend: str, process_type: str) -> None:
    query = interpolate(expr, process_type)
    promql_parser.parse(query)
    r = await client.get("/api/v1/query_range", params={"query": query, "step": 60, **WINDOW}, headers=auth())
    doc = await r.json()
    assert (r.status, doc["status"], doc["data"]["resultType"]) == (200, "success", "matrix"), doc
    rows = doc["data"]["result"]
    assert rows and all(row["values"] for row in rows), query
    for row in rows:
        assert all(float(v) >= 0 for _, v in row["values"])
        assert row["metric"].get("app", "shop") == "shop"
        assert row["metric"].get("process_type", "web") in ("web", "worker")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert label in row["metric"], f"{where}: legend {legend!r} names {label}, not in {row['metric']}"


async def test_the_events_annotation_marks_the_minutes_of_the_events(client: TestClient[Any, Any]) -> None:
    (annotation,) = (a for a in DASHBOARD["annotations"]["list"] if "expr" in a)
    query = interpolate(annotation["expr"], "web|worker")
    r = await client.get("/api/v1/query_range", params={"query": query, "step": 60, **WINDOW}, headers=auth())
    got = {(row["metric"]["event"], row["metric"]["process_type"]): [ts for ts, _ in row["values"]]
           for row in (await r.json())["data"]["result"]}
    assert got == {(name, proc): [ts] for _, proc, ts, name in EVENTS}


@pytest.mark.parametrize(("name", "expected"), [("app", ["shop"]), ("process_type", ["web", "worker"])])
async def test_the_variables_list_the_app_and_its_process_types(client: TestClient[Any, Any], name: str,
                                                                expected: list[str]) -> None:
    """Grafana answers ``label_values(selector, label)`` from /api/v1/label/<label>/values?match[]=selector."""
    v = variable(name)
    assert v["definition"] == v["query"]["query"]
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["definition"])
    assert m, v["definition"]
    selector, label = interpolate(m[1], ""), m[2]
    assert label == name
    promql_parser.parse(selector)
    r = await client.get(f"/api/v1/label/{label}/values", params={"match[]": selector, **WINDOW}, headers=auth())
    doc = await r.json()
    assert (r.status, doc["status"], doc["data"]) == (200, "success", expected)


# --- the sidecar's ConfigMap ---------------------------------------------------------------------------------


def test_the_configmap_is_off_by_default() -> None:
    docs = render()
    assert not [d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == CONFIGMAP
                or "grafana_dashboard" in d["metadata"].get("labels", {})]


def test_the_configmap_carries_the_sidecar_label_and_the_dashboard_file() -> None:
    docs = render({"grafanaDashboard": {"enabled": True}})
    cm = one(docs, "ConfigMap", CONFIGMAP)
    meta = cm["metadata"]
    assert meta["labels"]["grafana_dashboard"] == "1" and meta["namespace"] == NAMESPACE
    assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE and "annotations" not in meta
    assert list(cm["data"]) == ["minutely.json"]
    assert cm["data"]["minutely.json"] == DASHBOARD_FILE.read_text().rstrip("\n")
    assert json.loads(cm["data"]["minutely.json"]) == DASHBOARD
    kubernetes_validate.validate(cm, kubernetes_validate.utils.latest_version(), strict=True)
    report = helm.lint(CHART, {"grafanaDashboard": {"enabled": True}}, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_label_namespace_and_annotations_follow_the_values() -> None:
    values = {"grafanaDashboard": {"enabled": True, "label": "example.com/dashboard", "labelValue": "minutely",
                                   "namespace": "monitoring", "annotations": {"grafana_folder": "minutely"}}}
    meta: Doc = one(render(values), "ConfigMap", CONFIGMAP)["metadata"]
    assert meta["labels"]["example.com/dashboard"] == "minutely" and "grafana_dashboard" not in meta["labels"]
    assert meta["namespace"] == "monitoring" and meta["annotations"] == {"grafana_folder": "minutely"}


@pytest.mark.parametrize(("values", "where"), [
    ({"labelValue": 1}, "/grafanaDashboard/labelValue"),
    ({"label": "not a label"}, "/grafanaDashboard/label"),
    ({"namespace": "Monitoring"}, "/grafanaDashboard/namespace"),
    ({"folder": "minutely"}, "folder"),
])
def test_bad_dashboard_values_are_refused_by_the_schema(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render({"grafanaDashboard": {"enabled": True, **values}})

