"""HTTP ingestion: Logplex HTTPS drains and a JSON batch API -> topic ``observations``.

What senders can rely on:
* 2xx only after Kafka acknowledged every record (acks=all); never a 2xx for data not durably produced.
* 503 with Retry-After while Kafka (or the token/dedup table) is unavailable; 413 over the body limit;
  400 with ``{"error": {"code", "message"}}`` for malformed bodies; 401 without and 403 with a wrong
  token, producing nothing. Never a 5xx for a client's bad data.
* Records are produced as arrays of one app's observations (the pipeline's batched form), keyed by app.
* The app is the one the token belongs to. The router line's ``host`` field is ignored: custom domains
  make it unreliable, and a token must not write into another app.

Run with ``python -m app ingest``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import msgspec
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from app import models
from app.api.web import SETTINGS_KEY, error, healthz, json_response
from app.errors import PipelineError, RetriableError
from app.ingest import logplex
from app.ingest.dedup import Claim, FrameDedup
from app.ops import kafka
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import TokenInfo
from app.storage.tokens import TokenStore, bearer

log = logging.getLogger(__name__)

Produce = Callable[[str, Sequence[tuple[bytes, bytes]]], Awaitable[None]]
"""(topic, [(key, value)]) -> returns once the broker acknowledged all of them; RetriableError otherwise."""


class KafkaProducer:
    """One long-lived aiokafka producer (acks=all). Connects in the background until the broker answers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        bootstrap = kafka.bootstrap(self.settings)
        delay_s = 0.5
        while True:
            # max_batch_size: aiokafka keeps one batch in flight per partition, and one app's frames all go
            # to one partition (key = app). With the 16 KB default every ~70 KB message is a batch of its own,
            # so concurrent requests queue for that partition's round trips; a large batch carries every frame
            # that arrived during the previous round trip. Capped below the brokers' message.max.bytes.
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                                        max_batch_size=self.settings.kafka_max_batch_bytes,
                                        max_request_size=8 * 1024 * 1024,
                                        request_timeout_ms=int(self.settings.produce_timeout_s * 1000),
                                        **kafka.client_kwargs(self.settings))
            try:
                await producer.start()
                self._producer = producer
                return
            except (KafkaError, OSError) as exc:
                await producer.stop()
                log.warning("Kafka not reachable at %s (%s); retrying in %.1f s", bootstrap, exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)

    @property
    def ready(self) -> bool:
        return self._producer is not None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._producer is not None:
            await self._producer.stop()

    async def produce(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
        if self._producer is None:
            raise RetriableError("Kafka is not connected yet", action="check METRICS_BROKER_URL and the brokers",
                                 retry_after_s=2)
        try:
            futs = [await self._producer.send(topic, value=v, key=k) for k, v in records]
            await asyncio.wait_for(asyncio.gather(*futs), self.settings.produce_timeout_s)
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            raise RetriableError(f"Kafka did not acknowledge: {exc!r}", action="check the brokers",
                                 retry_after_s=2) from exc


def chunks(app: str, observations: Sequence[Any], size: int) -> list[tuple[bytes, bytes]]:
    key = app.encode()
    encode = msgspec.json.encode
    return [(key, encode(observations[i:i + size])) for i in range(0, len(observations), size)]


Handler = Callable[["Ingest", web.Request], Awaitable[web.Response]]


def answers_unavailable(handler: Handler) -> Handler:
    """Dependencies down -> 503 with Retry-After (the sender retries); never a 5xx without one."""

    async def wrapped(self: "Ingest", request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except RetriableError as exc:
            return error(503, "unavailable", str(exc), {"Retry-After": str(max(1, int(exc.retry_after_s)))})
        except PipelineError as exc:
            log.error("%s failed: %s", request.path, exc)
            return error(503, "misconfigured", "the service is misconfigured; the operator has the cause in the "
                                               "log", {"Retry-After": "30"})

    return wrapped


class Ingest:
    def __init__(self, settings: Settings, *, tokens: TokenStore, dedup: FrameDedup, produce: Produce,
                 counters: Counters) -> None:
        self.settings = settings
        self.tokens = tokens
        self.dedup = dedup
        self.produce = produce
        self.counters = counters

    async def _auth(self, request: web.Request, kind: str) -> Any:
        # ?token= only for drains (Logplex can send nothing else on some setups); a write token in a query
        # string would end up in access logs.
        token = bearer(request.headers, request.query if kind == "drain" else {})
        if not token:
            where = ("Authorization: Bearer <token>, basic auth password, Logplex-Drain-Token header or ?token="
                     if kind == "drain" else "Authorization: Bearer <token>")
            return error(401, "missing_token", f"send a {kind} token: {where}")
        info = await self.tokens.verify(token, kind)
        if info is None:
            return error(403, "invalid_token", f"the token is unknown, revoked, or not a {kind} token")
        return info

    async def _authorized_body(self, request: web.Request, kind: str) -> tuple[TokenInfo, bytes] | web.Response:
        """The token's description and the body, or the 401/403/413 answer. The body is read only after
        the token was accepted."""
        info = await self._auth(request, kind)
        if isinstance(info, web.Response):
            return info
        body = await _read(request, retriable=kind == "drain")
        if isinstance(body, web.Response):
            return body
        return info, body

    @answers_unavailable
    async def drain(self, request: web.Request) -> web.Response:
        got = await self._authorized_body(request, "drain")
        if isinstance(got, web.Response):
            return got
        info, body = got
        try:
            frame = logplex.parse_frame(body, info.app)
        except logplex.FrameError as exc:
            return error(400, "malformed_frame", str(exc))
        count = request.headers.get("Logplex-Msg-Count")
        if count is not None and (not count.isdigit() or int(count) != frame.messages):
            return error(400, "msg_count_mismatch",
                         f"Logplex-Msg-Count is {count!r} but the frame holds {frame.messages} messages")
        frame_id = request.headers.get("Logplex-Frame-Id")
        if frame_id is not None and len(frame_id) > 200:
            return error(400, "bad_frame_id", "Logplex-Frame-Id longer than 200 characters")
        if frame_id:
            claim = await self.dedup.claim(info.app, frame_id)
            if claim is Claim.DONE:
                self.counters.inc("drain_frames_deduplicated")
                return web.Response(status=204)
            if claim is Claim.BUSY:
                return error(503, "frame_in_flight", "this frame is being delivered; retry",
                             {"Retry-After": "2"})
        try:
            await self._deliver(info.app, frame, frame_id)
        except BaseException:
            if frame_id:
                await self.dedup.release(info.app, frame_id)
            raise
        if frame_id:
            await self.dedup.complete(info.app, frame_id)
        self.counters.inc("drain_frames")
        self.counters.inc("drain_lines_ignored", frame.ignored)
        self.counters.inc("ingest_observations_produced", len(frame.encoded))
        return web.Response(status=204)

    async def _deliver(self, app: str, frame: logplex.ParsedFrame, frame_id: str | None) -> None:
        size = self.settings.ingest_chunk_observations
        key = app.encode()
        records = [(key, b"[" + b",".join(frame.encoded[i:i + size]) + b"]")
                   for i in range(0, len(frame.encoded), size)]
        dead = [(app.encode(), orjson.dumps({"kind": "rejected", "reason": b.reason, "app": app, "record": b.line,
                                             "source": {"drain_frame": frame_id}})) for b in frame.bad]
        if records:
            await self.produce(self.settings.observations_topic, records)
        if dead:
            await self.produce(self.settings.dlq_topic, dead)
            self.counters.inc("drain_lines_bad", len(dead))

    @answers_unavailable
    async def observations(self, request: web.Request) -> web.Response:
        got = await self._authorized_body(request, "write")
        if isinstance(got, web.Response):
            return got
        info, body = got
        parsed = parse_json_body(body, self.settings.max_message_bytes)
        if isinstance(parsed, models.Reject):
            return error(400, "malformed_body", parsed.reason)
        good: list[Any] = []
        rejected: list[dict[str, Any]] = []
        for index, item in parsed:
            if isinstance(item, models.Reject):
                rejected.append({"index": index, "reason": item.reason})
            elif item.app != info.app:
                rejected.append({"index": index, "reason": f"record is for app {item.app!r} but the token is "
                                                           f"for app {info.app!r}"})
            else:
                good.append(item)
        if not good:
            if not rejected:
                return json_response({"accepted": 0, "rejected": []})
            return json_response({"error": {"code": "no_valid_records",
                                            "message": "every record was rejected; see rejected"},
                                  "rejected": rejected[:1000]}, 400)
        await self.produce(self.settings.observations_topic,
                           chunks(info.app, good, self.settings.ingest_chunk_observations))
        self.counters.inc("ingest_observations_produced", len(good))
        self.counters.inc("ingest_records_rejected", len(rejected))
        return json_response({"accepted": len(good), "rejected": rejected[:1000]})


async def _read(request: web.Request, *, retriable: bool = False) -> bytes | web.Response:
    """The body, or 413 over the size limit, or -- when it trickles in slower than the timeout allows (a
    slow-body client must not hold a connection and a buffer for ever) -- 408, or 503 with Retry-After when
    ``retriable``: Logplex drops a frame on any 4xx but retries a 5xx, and a slow network is no reason to
    lose a frame."""
    timeout_s = request.app[SETTINGS_KEY].ingest_body_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        message = f"the request body did not arrive within {timeout_s:g} s; send it at once"
        resp = (error(503, "body_timeout", message, {"Retry-After": "5"}) if retriable
                else error(408, "body_timeout", message))
        resp.force_close()
        return resp
    except web.HTTPRequestEntityTooLarge:
        return error(413, "body_too_large", f"request body over the {request.app[SETTINGS_KEY].ingest_max_body_bytes} "
                                            "byte limit; send smaller batches")


def parse_json_body(body: bytes, max_bytes: int) -> list[tuple[int, Any]] | models.Reject:
    """A JSON array (or one object) or NDJSON -> [(index, Observation | Reject)]."""
    head = body.lstrip()[:1]
    lines = body.split(b"\n")
    if head == b"[" or len([ln for ln in lines if ln.strip()]) <= 1:
        decoded = models.decode(body, max_bytes)
        if isinstance(decoded, models.Reject):
            return decoded
        return _indexed(decoded)
    out: list[tuple[int, Any]] = []
    index = 0
    for line in lines:
        if not line.strip():
            continue
        d = models.decode(line, max_bytes)
        if isinstance(d, models.Reject):
            out.append((index, d))
        else:
            out.extend((index, item) for _, item in _indexed(d))
        index += 1
    return out


def _indexed(d: models.Decoded) -> list[tuple[int, Any]]:
    idx = d.indexes if d.indexes is not None else range(len(d.observations))
    out: list[tuple[int, Any]] = list(zip(idx, d.observations))
    out.extend((r.index, r) for r in d.rejects)
    out.sort(key=lambda t: t[0])
    return out


class LoadShedding:
    """Bounds the request bytes in flight (``METRICS_INGEST_MAX_INFLIGHT_BYTES``). Past the budget a request
    is answered 503 with Retry-After at once, its body unread: at twice its capacity the ingest stays at a
    bounded memory and a steady throughput, where queueing every request would grow without end. A request
    that declares no length counts as the largest body allowed; one request is always let in, so a budget
    below the body limit cannot refuse everything."""

    def __init__(self, settings: Settings, counters: Counters) -> None:
        self.budget_bytes = settings.ingest_max_inflight_bytes
        self.max_body_bytes = settings.ingest_max_body_bytes
        self.counters = counters
        self.held_bytes = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        size = min(request.content_length if request.content_length is not None else self.max_body_bytes,
                   self.max_body_bytes)
        if self.held_bytes and self.held_bytes + size > self.budget_bytes:
            self.counters.inc("ingest_requests_shed")
            return error(503, "overloaded", "the ingest is at capacity; retry after the delay",
                         {"Retry-After": "1"})
        self.held_bytes += size
        try:
            return await handler(request)
        finally:
            self.held_bytes -= size


def make_ingest_app(ingest: Ingest, settings: Settings, *, extra: Callable[[web.Application], None] | None = None
                    ) -> web.Application:
    webapp = web.Application(client_max_size=settings.ingest_max_body_bytes,
                             middlewares=[LoadShedding(settings, ingest.counters).middleware])
    webapp.router.add_post("/v1/drains/logplex", ingest.drain)
    webapp.router.add_post("/v1/observations", ingest.observations)
    webapp[SETTINGS_KEY] = settings
    webapp.router.add_get("/healthz", healthz)
    if extra is not None:
        extra(webapp)
    return webapp


def build(settings: Settings, counters: Counters) -> web.Application:
    """The ingest process: tokens, dedup and producer started and stopped with the web app."""
    from app.migration.control import MigrationControl
    from app.migration.tables import FollowingFrames, FollowingTokens

    control = MigrationControl(settings, counters=counters)  # tokens and frame ids follow a store migration
    tokens = TokenStore(settings, table=FollowingTokens(settings, control.current))
    dedup = FrameDedup(settings, table=FollowingFrames(settings, control.current))
    producer = KafkaProducer(settings)
    ingest = Ingest(settings, tokens=tokens, dedup=dedup, produce=producer.produce, counters=counters)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await control.start()
        await tokens.start()
        await dedup.start()
        await producer.start()
        yield
        await producer.stop()
        await dedup.stop()
        await tokens.stop()
        await control.stop()

    from app.ops import health as ops

    checks = {
        "broker": ops.broker_check(settings.broker_url),
        "producer": ops.flag_check(lambda: producer.ready, message="the Kafka producer is not connected yet",
                                   action="check METRICS_BROKER_URL and that the brokers are reachable "
                                          "(it keeps retrying)"),
        "tokens": tokens.ping,
        "dedup": dedup.ping,
    }
    webapp = make_ingest_app(ingest, settings, extra=lambda w: ops.add_ops_routes(w, counters=counters,
                                                                                   checks=checks))
    webapp.cleanup_ctx.append(lifecycle)
    return webapp
