"""Broker faults on the real stack (docs/reliability.md): the Kafka broker SIGKILLed and restarted on its log
directory, or unreachable (frozen with SIGSTOP: connections hang, nothing answers), while traffic flows, a
worker aggregates and an ingest process takes requests. Neither process is restarted by hand. While Kafka is
gone the ingest answers 503 with Retry-After and acknowledges nothing Kafka does not hold; afterwards every
stored minute equals the generator's truth. ``MINUTELY_CHAOS=1`` (``make chaos``) keeps Kafka away 60 s."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from app.ops.kafka import partition_of
from tables.aggregate import Aggregate
from tests.integration.pipeline import FastTraffic, Pipeline, check_against_truth, env_flag, wait_truth_stored

pytestmark = pytest.mark.integration

CHAOS = env_flag("MINUTELY_CHAOS")
DOWN_S = 60.0 if CHAOS else 15.0
TRAFFIC_S = 2 * DOWN_S + 30.0
"""Kafka goes away a third of the way in, for DOWN_S."""


def probe_app(apps: list[str], partitions: int) -> str:
    """An app on a partition none of ``apps`` uses: its observations carry the wall clock's time, which must
    not move the generated apps' partition watermarks (that would make their data late)."""
    used = {partition_of(a, partitions) for a in apps}
    return next(f"probe-{i}" for i in range(1000) if partition_of(f"probe-{i}", partitions) not in used)


def post(url: str, body: bytes, token: str) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


class Prober:
    """One router observation a call through the ingest's JSON API, for an app of its own."""

    def __init__(self, url: str, token: str, app: str) -> None:
        self.url, self.token, self.app = url, token, app
        self.answers: list[int] = []
        self.start_ms = int(time.time() * 1000) // 60_000 * 60_000

    def send(self) -> tuple[int, dict[str, str]]:
        body = orjson.dumps([{"kind": "router", "app": self.app, "dyno": "web.1", "ts": int(time.time() * 1000),
                              "status": 200, "service_ms": 5.0}])
        status, headers = post(self.url, body, self.token)
        self.answers.append(status)
        return status, headers

    def stored_requests(self, p: Pipeline) -> int:
        minutes = p.stored([self.app], ["web"], self.start_ms // 1000, self.start_ms // 1000 + 3600)
        return sum(int(Aggregate.from_record(m).summary().get("requests", 0)) for m in minutes.values())


@pytest.mark.parametrize("fault", ["killed", "unreachable"])
def test_broker_fault_loses_and_doubles_nothing(dynamo: DynamoServer, tmp_path: Path, fault: str) -> None:
    broker = KafkaBroker(data_dir=tmp_path / "kafka")  # its own: it is killed or frozen
    broker.start()
    p = Pipeline(broker, dynamo, tmp_path, METRICS_IDLE_TIMEOUT_S="8")
    try:
        p.start(data_dir=tmp_path / "state")
        ingest = p.start_ingest() + "/v1/observations"
        apps = [f"app-{i}" for i in range(3)]  # FastTraffic's
        app = probe_app(apps, p.settings.kafka.partitions)
        probe = Prober(ingest, p.read_token(app, "write"), app)
        deadline = time.monotonic() + 60
        while probe.send()[0] != 200:  # the ingest producer connects in the background
            assert time.monotonic() < deadline, "the ingest never accepted"
            time.sleep(0.5)
        traffic = FastTraffic(broker, p.settings.kafka.observations_topic, duration_s=TRAFFIC_S, speedup=3.0, seed=43)
        time.sleep(TRAFFIC_S / 3)

        if fault == "killed":
            broker.kill()
        else:
            broker.freeze()
        t_down = time.monotonic()
        while_down: list[int] = []
        while time.monotonic() - t_down < DOWN_S:
            status, headers = probe.send()
            while_down.append(status)
            assert status == 503 and int(headers["Retry-After"]) >= 1, (status, headers)
        if fault == "killed":
            broker.start()  # same log directory, same ports
        else:
            broker.thaw()
        t_back = time.monotonic()
        while probe.send()[0] != 200:
            assert time.monotonic() - t_back < 120, "the ingest did not recover after Kafka came back"
            time.sleep(1)
        ingest_back_s = time.monotonic() - t_back

        traffic.wait(TRAFFIC_S + 180)
        stored = wait_truth_stored(p, traffic.truth, traffic.start_ms, 180)
        worst = check_against_truth(stored, traffic.truth)
        assert set(stored) == traffic.truth.keys(), sorted(set(stored) - traffic.truth.keys())[:5]
        # Every 2xx'd probe is counted; a 503'd one may or may not have reached Kafka (a timeout after the
        # write), never more than were sent.
        acked, sent = probe.answers.count(200), len(probe.answers)
        deadline = time.monotonic() + 60
        while (counted := probe.stored_requests(p)) < acked and time.monotonic() < deadline:
            time.sleep(1)
        assert acked <= counted <= sent, (acked, counted, sent)
        assert p.proc is not None and p.proc.poll() is None, "the worker had to be restarted"
        assert p.ingest_proc.poll() is None, "the ingest process had to be restarted"
        print(f"\nKafka {fault} {DOWN_S:.0f} s: ingest answered {len(while_down)} x 503 with Retry-After while "
              f"it was gone, 0 x 2xx, 200 again {ingest_back_s:.1f} s after; probes {acked} acknowledged, "
              f"{counted} counted, {sent} sent; {traffic.observations} observations -> {len(stored)} minutes "
              f"equal to the truth (0 lost, 0 doubled, worst percentile error {100 * worst:.2f} %); "
              f"worker and ingest never restarted")
    finally:
        p.stop()
        broker.thaw()
        broker.stop()
