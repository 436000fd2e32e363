"""Baseline for the benchmark: a Faust agent that only counts messages (stream.take(5000)).

Run as ``python -m tests.bench.bare_faust worker``; BENCH_TOPIC, BENCH_N, BENCH_OUT, BENCH_BROKER set by
the benchmark. Writes ``<messages counted after the first batch> <seconds>`` to BENCH_OUT.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import faust

app = faust.App(f"bare-{uuid.uuid4().hex[:6]}", broker=os.environ["BENCH_BROKER"], store="memory://",
                value_serializer="raw", key_serializer="raw", web_enabled=False,
                consumer_auto_offset_reset="earliest", broker_session_timeout=6, broker_heartbeat_interval=1,
                broker_rebalance_timeout=4, topic_partitions=int(os.environ.get("BENCH_PARTITIONS", "4")))
topic = app.topic(os.environ["BENCH_TOPIC"], value_type=bytes)
N = int(os.environ["BENCH_N"])


@app.agent(topic)
async def count(stream: Any) -> None:
    n = 0
    t0 = 0.0
    first = 0
    async for batch in stream.take(5000, within=1):
        if not t0:
            t0, first = time.perf_counter(), len(batch)
        n += len(batch)
        if n >= N:
            with open(os.environ["BENCH_OUT"], "w") as f:
                f.write(f"{n - first} {time.perf_counter() - t0}")


if __name__ == "__main__":
    app.main()
