"""Load for the ingest benchmark, from its own process: POST pre-built Logplex frames as fast as accepted.

    python -m tests.bench.drain_client URL TOKEN FRAMES_FILE CONCURRENCY [--frame-ids]
Prints ``<lines> <seconds> <non_2xx>``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from app.local.loadgen import logplex_headers


def body_text(body: bytes) -> str:
    return body[:120].decode("utf-8", "replace")


async def main() -> None:
    url, token, path, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    frame_ids = "--frame-ids" in sys.argv
    frames: list[tuple[bytes, int]] = [(f.encode("latin-1"), n) for f, n in
                                      orjson.loads(await asyncio.to_thread(Path(path).read_bytes))]
    queue = list(reversed(frames))
    failures = 0
    lines = 0
    statuses: Counter[str] = Counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures, lines
        while queue:
            body, n = queue.pop()
            headers = logplex_headers(token, n)
            if not frame_ids:
                del headers["Logplex-Frame-Id"]
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status >= 300:
                    failures += 1
                    statuses[f"{r.status} {body_text(await r.read())}"] += 1
                else:
                    lines += n

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        print(lines, time.perf_counter() - t0, failures)
    if statuses:
        print(dict(statuses.most_common(3)), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
