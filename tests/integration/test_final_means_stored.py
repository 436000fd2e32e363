""""Final" means stored (agents/progress.py), on the real stack: the worker's store is cut off while traffic
flows (a TCP proxy in front of dynalite that stops forwarding), a separate web process reads dynalite
directly. Ranges older than the settle time stay live while the sink lags; once the store is back and the
sink caught up, the same web process (caches on) answers the generator's exact truth."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.cli import start_role, wait_http, worker_env
from app.local.embedded import DynamoServer, KafkaBroker, free_port
from app.local.traffic import Generator, produce
from tests.integration.pipeline import Pipeline
from tests.integration.test_query_api import create_tokens

pytestmark = pytest.mark.integration


class CutProxy:
    """Forwards TCP to ``target`` until :meth:`cut`: then every connection is closed and new ones are
    refused (the store is down for whoever talks through it) until :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for w in list(self.writers):
            w.close()
        self.writers.clear()

    def cut(self) -> None:
        self._call(self._stop())

    def restore(self) -> None:
        self._call(self._start())

    def close(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class ViaProxy:
    """What Pipeline needs of a DynamoDB server: the endpoint the worker is given."""

    endpoint: str


def get(url: str, token: str) -> tuple[dict[str, Any], Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()), r.headers


def test_ranges_stay_live_while_the_sink_lags_and_equal_the_truth_once_stored(
        broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path) -> None:
    proxy = CutProxy(int(dynamo.endpoint.rsplit(":", 1)[1]))
    p = Pipeline(broker, ViaProxy(proxy.endpoint), tmp_path,  # type: ignore[arg-type]
                 METRICS_QUERY_SETTLE_S="20", METRICS_BACKOFF_MAX_MS="1000", METRICS_MAX_ATTEMPTS="1")
    p.settings = replace(p.settings, dynamodb_endpoint=dynamo.endpoint)  # the test's own reads: direct
    web = None
    try:
        p.start(data_dir=tmp_path / "state")
        web_port = free_port()
        env = worker_env(broker.url, dynamo.endpoint, data_dir=str(tmp_path / "web"), web_port=web_port,
                         extra=p.env_overrides)
        web = start_role("web", env, log_path=p.log_path.with_name(p.log_path.stem + "-web.log"))
        wait_http(f"http://127.0.0.1:{web_port}/healthz", 60, web)
        tokens = create_tokens(p, ["app-0"])
        base = f"http://127.0.0.1:{web_port}/v1/apps/app-0/metrics?process_type=web"

        now_s = int(time.time())
        start_s = now_s - now_s % 600 - 600  # ten minutes that are all older than the settle time
        gen = Generator(apps=1, dynos=2, seed=9, start_ms=start_s * 1000, keep_truth=True)
        msgs = gen.messages(per_message=200, span_ms=10_000)
        batch = [next(msgs) for _ in range(6 * 10)]
        proxy.cut()  # the store goes away for the worker; the web process still reads it
        asyncio.run(produce(broker.address, p.settings.observations_topic, batch))
        p.wait_stats(lambda s: s.get("minutes_emitted", 0) >= 10 and s.get("sink_retries", 0) >= 2, 120,
                     "minutes emitted while the sink retries")
        urls = {res: f"{base}&since={start_s}&until={start_s + 600}&resolution={name}"
                for res, name in ((60, "1m"), (600, "10m"))}
        for res, url in urls.items():
            body, headers = get(url, tokens["app-0"])
            assert body["points"] == [] and headers["X-Final"] == "false", (res, body)
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as r:
            assert b"stored_through_lag_seconds" in r.read()

        proxy.restore()
        assert gen.truth is not None
        truth = gen.truth
        deadline = time.monotonic() + 120
        while True:
            answers = {res: get(url, tokens["app-0"]) for res, url in urls.items()}
            if all(h["X-Final"] == "true" for _, h in answers.values()):
                break
            for res, (body, headers) in answers.items():  # live meanwhile: re-read, possibly incomplete
                assert headers["Cache-Control"] == "private, no-cache"
            assert time.monotonic() < deadline, f"not stored and final within 120 s: {answers}"
            time.sleep(1)
        bodies = {res: body for res, (body, _) in answers.items()}
        for res, body in bodies.items():
            assert len(body["points"]) == 600 // res, (res, body)
            for point in body["points"]:
                raw = np.concatenate([np.asarray(v) for (a, proc, ms), v in truth.service_ms.items()
                                      if a == "app-0" and proc == "web" and point["ts"] <= ms // 1000 < point["ts"] + res])
                assert point["requests"] == len(raw) and point["response_ms"]["max"] == raw.max(), (res, point)
                for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                    exact = float(np.quantile(raw, q))
                    assert abs(point["response_ms"][name] - exact) <= 0.01 * exact, (res, point["ts"], name)
        # The same answers again from the same process: the complete ones are what it now serves.
        assert {res: get(url, tokens["app-0"])[0] for res, url in urls.items()} == bodies
    finally:
        if web is not None and web.poll() is None:
            web.terminate()
            web.wait(timeout=20)
        p.stop()
        proxy.close()
