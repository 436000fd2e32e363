"""PromQL evaluation (app/api/prometheus/engine.py) on hand-made series, against Prometheus's semantics. The
differential test against a real Prometheus server comes with the HTTP API (docs/prometheus.md)."""

from __future__ import annotations

import math

import pytest

from app.api.prometheus import engine
from app.api.prometheus.engine import NAME, Evaluator, QueryError, Scalar, Series, format_value

T0 = 1_764_000_000 - 1_764_000_000 % 600


def series(name: str, points: list[tuple[int, float]], **labels: str) -> tuple[tuple[tuple[str, str], ...],
                                                                             tuple[list[float], list[float]]]:
    key = tuple(sorted({NAME: name, **labels}.items()))
    return key, ([float(T0 + t) for t, _ in points], [v for _, v in points])


REQ: Series = dict([
    series("minutely_requests", [(0, 10), (60, 20), (120, 30)], app="a", process_type="web", status_class="2xx"),
    series("minutely_requests", [(0, 1), (60, 2), (120, 3)], app="a", process_type="web", status_class="5xx"),
    series("minutely_requests", [(0, 5), (60, 5)], app="a", process_type="worker", status_class="2xx"),
])


def run(query: str, t: float, data: Series = REQ, lookback_s: float = 300) -> engine.Value:
    expr = engine.parse(query)
    fetched = {}
    for sel in engine.selectors(expr):
        fetched[sel] = {k: v for k, v in data.items()
                        if (sel.name is None or dict(k)[NAME] == sel.name) and sel.matches(dict(k))}
    return Evaluator(fetched, lookback_s=lookback_s).eval(expr, t)


def vec(v: engine.Value) -> dict[str, float]:
    assert isinstance(v, dict)
    return {",".join(f"{k}={x}" for k, x in labels if k != NAME): y for labels, y in v.items()}


def test_grafana_save_and_test() -> None:
    assert run("1+1", 4) == Scalar(2.0)


def test_instant_selectors_take_the_newest_sample_within_the_lookback() -> None:
    got = vec(run('minutely_requests{status_class="2xx"}', T0 + 90))
    assert got == {"app=a,process_type=web,status_class=2xx": 20.0, "app=a,process_type=worker,status_class=2xx": 5.0}
    assert vec(run('minutely_requests{process_type!="web"}', T0 + 60 + 300)) == {}  # past the lookback
    assert len(vec(run('minutely_requests{process_type=~"web|worker"}', T0 + 60))) == 3
    assert len(vec(run('minutely_requests{status_class!~"2.."}', T0 + 60))) == 1
    assert vec(run("minutely_requests offset 1m", T0 + 60))["app=a,process_type=web,status_class=2xx"] == 10.0


def test_aggregations_by_and_without() -> None:
    assert vec(run("sum by (process_type) (minutely_requests)", T0 + 120)) == {"process_type=web": 33.0,
                                                                                "process_type=worker": 5.0}
    assert vec(run("sum without (status_class) (minutely_requests)", T0 + 120)) == {
        "app=a,process_type=web": 33.0, "app=a,process_type=worker": 5.0}
    assert vec(run("count(minutely_requests)", T0 + 60)) == {"": 3.0}
    assert vec(run("max(minutely_requests)", T0 + 60)) == {"": 20.0}
    assert vec(run("avg(minutely_requests)", T0 + 60)) == {"": 9.0}
    top = vec(run("topk(1, minutely_requests)", T0 + 60))
    assert top == {"app=a,process_type=web,status_class=2xx": 20.0}
    assert vec(run("bottomk by (process_type) (1, minutely_requests)", T0 + 60)) == {
        "app=a,process_type=web,status_class=5xx": 2.0, "app=a,process_type=worker,status_class=2xx": 5.0}


def test_arithmetic_comparisons_and_matching() -> None:
    ratio = vec(run('sum by (process_type) (minutely_requests{status_class="5xx"}) / on(process_type) '
                    "sum by (process_type) (minutely_requests)", T0 + 120))
    assert ratio == {"process_type=web": 3 / 33}
    assert vec(run("minutely_requests > 4", T0 + 60)) == {"app=a,process_type=web,status_class=2xx": 20.0,
                                                         "app=a,process_type=worker,status_class=2xx": 5.0}
    kept = run("minutely_requests > 4", T0 + 60)
    assert isinstance(kept, dict) and all(dict(k)[NAME] == "minutely_requests" for k in kept)  # filters keep it
    assert sorted(vec(run("minutely_requests > bool 4", T0 + 60)).values()) == [0.0, 1.0, 1.0]
    doubled = run("minutely_requests * 2", T0 + 60)
    assert isinstance(doubled, dict) and all(NAME not in dict(k) for k in doubled)
    assert vec(run('minutely_requests{status_class="2xx"} - ignoring(status_class) '
                   'minutely_requests{status_class="5xx"}', T0 + 60)) == {"app=a,process_type=web": 18.0}
    assert run("2 ^ 10 - 1", 0) == Scalar(1023.0)
    assert run("1 / 0", 0) == Scalar(math.inf)
    nan = run("0 / 0", 0)
    assert isinstance(nan, Scalar) and math.isnan(nan.value)
    with pytest.raises(QueryError, match="many-to-many"):
        run("minutely_requests + on(app) minutely_requests", T0 + 60)


def test_functions() -> None:
    assert run("time()", T0 + 7) == Scalar(float(T0 + 7))
    over = vec(run('max_over_time(minutely_requests{status_class="2xx",process_type="web"}[2m])', T0 + 120))
    assert over == {"app=a,process_type=web,status_class=2xx": 30.0}  # (t-2m, t]: 60 and 120
    assert vec(run('sum_over_time(minutely_requests{status_class="5xx"}[2m])', T0 + 120)) == {
        "app=a,process_type=web,status_class=5xx": 5.0}
    assert vec(run('count_over_time(minutely_requests{process_type="worker"}[10m])', T0 + 120)) == {
        "app=a,process_type=worker,status_class=2xx": 2.0}
    assert vec(run('absent(minutely_requests{app="a",process_type="nope"})', T0)) == {"app=a,process_type=nope": 1.0}
    assert vec(run("absent(minutely_requests)", T0)) == {}
    with pytest.raises(QueryError, match="not supported"):
        run("rate(minutely_requests[5m])", T0)
    with pytest.raises(QueryError) as exc:
        run("sum(", T0)
    assert exc.value.kind == "bad_data"


@pytest.mark.parametrize(("value", "text"), [(2.0, "2"), (0.1, "0.1"), (1e21, "1000000000000000000000"),
                                             (1e-7, "0.0000001"), (math.nan, "NaN"), (math.inf, "+Inf"),
                                             (-math.inf, "-Inf"), (-3.5, "-3.5")])
def test_values_are_written_as_prometheus_writes_them(value: float, text: str) -> None:
    assert format_value(value) == text


def test_the_metric_model_of_one_point() -> None:
    from app.api.prometheus.model import METRICS, samples
    from tables.aggregate import Aggregate, BucketKey

    agg = Aggregate(BucketKey("a", "web", T0 * 1000), resolution_s=600)
    for i in range(100):
        agg.add_request(200 if i % 10 else 503, float(i), "H12" if i == 5 else None)
    agg.add_runtime(300.0, 0.0, 310.0, 512.0, 1.5)
    agg.add_metric("jobs", "counter", 50.0, T0 * 1000)
    agg.add_metric("depth", "gauge", 4.0, T0 * 1000)
    got = {(name, tuple(sorted(labels.items()))): v for name, labels, v in samples(agg.summary(), 600)}
    assert got[("minutely_requests", (("status_class", "2xx"),))] == 9.0  # 90 in 10 min: 9 per minute
    assert got[("minutely_requests", (("status_class", "5xx"),))] == 1.0
    assert got[("minutely_failed_requests", ())] == 1.0
    assert got[("minutely_response_time_ms", (("quantile", "1"),))] == 99.0
    assert got[("minutely_router_errors", (("code", "H12"),))] == 0.1
    assert got[("minutely_memory_mb", (("kind", "rss"), ("stat", "max")))] == 300.0
    assert got[("minutely_memory_quota_mb", ())] == 512.0
    assert got[("minutely_load", (("stat", "mean"),))] == 1.5
    assert got[("minutely_custom", (("metric", "jobs"), ("stat", "per_minute"), ("type", "counter")))] == 5.0
    assert got[("minutely_custom", (("metric", "depth"), ("stat", "last"), ("type", "gauge")))] == 4.0
    assert {name for name, _ in got} <= set(METRICS)
