"""Baselines for the benchmark: a Faust agent that only counts messages (stream.take(5000)), or one that
only decodes them, one at a time, with the worker's own decoder (BENCH_DECODE=1): the floor under any
aggregation.

Run as ``python -m tests.bench.bare_faust worker``; BENCH_TOPIC, BENCH_N, BENCH_OUT, BENCH_BROKER set by
the benchmark. Writes ``<messages> <seconds> <observations>`` counted after the first batch to BENCH_OUT.
The consumer's fetch size is the worker's (settings.kafka.fetch_max_partition_bytes), so only the work differs.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import faust

from app import models
from app.settings import Settings

app = faust.App(f"bare-{uuid.uuid4().hex[:6]}", broker=os.environ["BENCH_BROKER"], store="memory://",
                value_serializer="raw", key_serializer="raw", web_enabled=False,
                consumer_auto_offset_reset="earliest", broker_session_timeout=6, broker_heartbeat_interval=1,
                broker_rebalance_timeout=4, topic_partitions=int(os.environ.get("BENCH_PARTITIONS", "4")),
                consumer_max_fetch_size=Settings().kafka.fetch_max_partition_bytes)
topic = app.topic(os.environ["BENCH_TOPIC"], value_type=bytes)
N = int(os.environ["BENCH_N"])
DECODE = os.environ.get("BENCH_DECODE") == "1"
MAX_BYTES = Settings().windows.max_message_bytes


def done(n: int, secs: float, obs: int) -> None:
    with open(os.environ["BENCH_OUT"], "w") as f:
        f.write(f"{n} {secs} {obs}")


@app.agent(topic)
async def count(stream: Any) -> None:
    if DECODE:
        # One event at a time, like the worker: take() would leave the agent idle for `within` per batch
        # whenever fewer than max_ large messages arrive in that time.
        n = obs = 0
        t0 = 0.0
        async for value in stream:
            if not t0:
                t0 = time.perf_counter()
            else:
                decoded = models.decode(value, MAX_BYTES)
                obs += 0 if isinstance(decoded, models.Reject) else len(decoded.observations)
            n += 1
            if n >= N:
                done(n - 1, time.perf_counter() - t0, obs)
        return
    n = 0
    t0 = 0.0
    first = 0
    async for batch in stream.take(5000, within=1):
        if not t0:
            t0, first = time.perf_counter(), len(batch)
        n += len(batch)
        if n >= N:
            done(n - first, time.perf_counter() - t0, n - first)


if __name__ == "__main__":
    app.main()
