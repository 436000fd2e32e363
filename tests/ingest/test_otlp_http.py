"""The OTLP/HTTP answers of ``POST /v1/metrics`` (app/ingest/server.py), as the OTLP specification sets them:
the response in the request's encoding, partial success, 400 not retried, 429/503 with Retry-After, gzip
bodies with a limit after decompression, the app from the token only."""

from __future__ import annotations

import gzip
from typing import Any

import msgspec
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from app import models
from app.errors import RetriableError
from app.ingest import otlp
from tests.ingest.test_admission import T0_MS, Stack, bearer, make_stack  # noqa: F401  (fixture)
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)


@pytest.fixture
def stack(make_stack: Any) -> Any:  # noqa: F811
    return make_stack


PB = {"Content-Type": otlp.PROTOBUF}
JS = {"Content-Type": otlp.JSON}


def export(*values: float, app_attr: str = "someone-else") -> ExportMetricsServiceRequest:
    """Gauge points at T0, one per value; ``service.name`` names another app, which must not matter."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=app_attr)))
    rm.resource.attributes.append(KeyValue(key="service.instance.id", value=AnyValue(string_value="worker.2")))
    metric = rm.scope_metrics.add().metrics.add(name="queue.depth")
    for i, v in enumerate(values):
        metric.gauge.data_points.add(time_unix_nano=(T0_MS + i) * 1_000_000, as_double=v)
    return req


def produced(s: Stack) -> list[models.Observation]:
    dec = msgspec.json.Decoder(list[models.Observation])
    return [o for v in s.produced for o in dec.decode(v)]


async def test_protobuf_in_protobuf_out_and_the_app_is_the_tokens(stack: Any) -> None:
    s: Stack = await stack()
    r = await s.client.post("/v1/metrics", data=export(1, 2).SerializeToString(),
                            headers={**PB, **bearer(s.tokens["quiet-write"])})
    assert r.status == 200 and r.content_type == otlp.PROTOBUF
    resp = ExportMetricsServiceResponse.FromString(await r.read())
    assert not resp.HasField("partial_success")
    obs = produced(s)
    assert [(o.app, o.dyno, o.value) for o in obs] == [("quiet", "worker.2", 1.0), ("quiet", "worker.2", 2.0)]  # type: ignore[union-attr]


async def test_partial_success_in_json_names_the_reasons(stack: Any) -> None:
    s: Stack = await stack()
    body = json_format.MessageToJson(export(1, float("nan"), 3)).encode()
    r = await s.client.post("/v1/metrics", data=body, headers={**JS, **bearer(s.tokens["quiet-write"])})
    assert r.status == 200 and r.content_type == otlp.JSON
    got = await r.json()
    assert got["partialSuccess"]["rejectedDataPoints"] == "1"
    assert "NaN or infinite" in got["partialSuccess"]["errorMessage"]
    assert [o.value for o in produced(s)] == [1.0, 3.0]  # type: ignore[union-attr]


async def test_gzip_bodies_are_read_and_limited_after_decompression(stack: Any) -> None:
    s: Stack = await stack(ingest_max_body_bytes=200_000)
    auth = {**PB, **bearer(s.tokens["quiet-write"]), "Content-Encoding": "gzip"}
    r = await s.client.post("/v1/metrics", data=gzip.compress(export(5).SerializeToString()), headers=auth)
    assert r.status == 200 and [o.value for o in produced(s)] == [5.0]  # type: ignore[union-attr]
    big = export(*range(30_000)).SerializeToString()
    assert len(big) > 200_000 and len(gzip.compress(big)) < 200_000
    r = await s.client.post("/v1/metrics", data=gzip.compress(big), headers=auth)
    assert r.status == 413
    assert "after decompression" in status_pb2.Status.FromString(await r.read()).message


async def test_unreadable_bodies_are_400_with_a_status_in_the_requests_encoding(stack: Any) -> None:
    s: Stack = await stack()
    auth = bearer(s.tokens["quiet-write"])
    body = export(1, 2, 3).SerializeToString()
    r = await s.client.post("/v1/metrics", data=body[:-3], headers={**PB, **auth})
    assert r.status == 400 and r.content_type == otlp.PROTOBUF
    st = status_pb2.Status.FromString(await r.read())
    assert st.code == 3 and "protobuf" in st.message
    r = await s.client.post("/v1/metrics", data=b'{"resourceMetrics": [{', headers={**JS, **auth})
    assert r.status == 400 and "OTLP JSON" in (await r.json())["message"]
    r = await s.client.post("/v1/metrics", data=body, headers={"Content-Type": "text/plain", **auth})
    assert r.status == 415 and otlp.PROTOBUF in (await r.json())["message"]
    assert s.produced == []


async def test_tokens_are_required_and_must_be_write_tokens(stack: Any) -> None:
    s: Stack = await stack()
    body = export(1).SerializeToString()
    r = await s.client.post("/v1/metrics", data=body, headers=PB)
    assert r.status == 401 and "OTEL_EXPORTER_OTLP_HEADERS" in status_pb2.Status.FromString(await r.read()).message
    r = await s.client.post("/v1/metrics", data=body, headers={**PB, **bearer(s.tokens["quiet-drain"])})
    assert r.status == 403
    assert s.produced == []


async def test_throttled_is_429_and_a_broker_down_is_503_both_with_retry_after(stack: Any) -> None:
    body = export(1).SerializeToString()
    s: Stack = await stack(limit_ingest_rate_bytes_s=float(len(body)), limit_ingest_burst_bytes=len(body))
    auth = {**PB, **bearer(s.tokens["flood-write"])}
    assert (await s.client.post("/v1/metrics", data=body, headers=auth)).status == 200
    r = await s.client.post("/v1/metrics", data=body, headers=auth)
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert status_pb2.Status.FromString(await r.read()).code == 8

    async def down(topic: str, records: Any) -> None:
        raise RetriableError("Kafka did not acknowledge", action="check the brokers", retry_after_s=2)

    s.ingest.produce = down
    r = await s.client.post("/v1/metrics", data=body, headers={**PB, **bearer(s.tokens["quiet-write"])})
    assert r.status == 503 and r.headers["Retry-After"] == "2"
    assert status_pb2.Status.FromString(await r.read()).code == 14
