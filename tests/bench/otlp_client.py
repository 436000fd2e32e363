"""Load for the OTLP benchmark, from its own process: POST pre-built OTLP protobuf bodies as fast as accepted.

    python -m tests.bench.otlp_client URL TOKEN BODIES_FILE CONCURRENCY
Prints ``<points taken> <seconds> <failed requests>``; a point refused in ``partial_success`` is not taken.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse


async def main() -> None:
    url, token, path, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    bodies: list[tuple[bytes, int]] = [(bytes.fromhex(b), n) for b, n in
                                       orjson.loads(await asyncio.to_thread(Path(path).read_bytes))]
    queue = list(reversed(bodies))
    taken = failures = 0
    why: Counter[str] = Counter()
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {token}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal taken, failures
        while queue:
            body, n = queue.pop()
            async with session.post(url, data=body, headers=headers) as r:
                answer = await r.read()
                if r.status != 200:
                    failures += 1
                    why[f"{r.status} {answer[:120]!r}"] += 1
                    continue
                refused = ExportMetricsServiceResponse.FromString(answer).partial_success.rejected_data_points
                if refused:
                    failures += 1
                    why[ExportMetricsServiceResponse.FromString(answer).partial_success.error_message[:200]] += 1
                taken += n - refused

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        print(taken, time.perf_counter() - t0, failures)
    if why:
        print(dict(why.most_common(3)), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
