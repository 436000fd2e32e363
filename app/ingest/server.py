"""HTTP ingestion: Logplex HTTPS drains and a JSON batch API -> topic ``observations`` (``python -m app ingest``).

2xx only after Kafka acknowledged every record; never a 5xx for a client's bad data; the app is the token's.
Reference: docs/ingest.md#what-senders-can-rely-on
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from app import models
from app.api.web import COUNTERS_KEY, SETTINGS_KEY, Reply, error, get_stats, healthz, json_response
from app.clock import Clock, SystemClock
from app.errors import PipelineError, RetriableError
from app.ingest import language, logplex, otlp
from app.ingest.admission import Admission, Refusal
from app.ingest.dedup import Claim, FrameDedup
from app.limits import Limits
from app.ops import kafka
from app.ops.stats import Counters
from app.settings import IngestSettings, KafkaSettings, Settings, WindowSettings
from app.storage.protocol import TokenInfo
from app.storage.tokens import TokenStore, bearer, client_middleware, drain_id

log = logging.getLogger(__name__)

T = TypeVar("T")
Produce = Callable[[str, Sequence[tuple[bytes, bytes]]], Awaitable[None]]
"""(topic, [(key, value)]) -> returns once the broker acknowledged all of them; RetriableError otherwise."""


class KafkaProducer:
    """One long-lived aiokafka producer (acks=all). Connects in the background until the broker answers."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        bootstrap = kafka.bootstrap(self.kafka)
        delay_s = 0.5
        while True:
            # max_batch_size: aiokafka keeps one batch in flight per partition, and one app's frames all go
            # to one partition (key = app). With the 16 KB default every ~70 KB message is a batch of its own,
            # so concurrent requests queue for that partition's round trips; a large batch carries every frame
            # that arrived during the previous round trip. Capped below the brokers' message.max.bytes.
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                                        max_batch_size=self.kafka.max_batch_bytes,
                                        max_request_size=8 * 1024 * 1024,
                                        request_timeout_ms=int(self.kafka.produce_timeout_s * 1000),
                                        **kafka.client_kwargs(self.kafka))
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
            await asyncio.wait_for(asyncio.gather(*futs), self.kafka.produce_timeout_s)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise RetriableError(f"Kafka did not acknowledge: {exc!r}", action="check the brokers",
                                 retry_after_s=2) from exc


def chunks(app: str, observations: Sequence[Any], size: int) -> list[tuple[bytes, bytes]]:
    key = app.encode()
    encode = msgspec.json.encode
    return [(key, encode(observations[i:i + size])) for i in range(0, len(observations), size)]


Handler = Callable[["Ingest", web.Request], Awaitable[web.Response]]
GRPC_CODES = {400: 3, 401: 16, 403: 7, 408: 4, 413: 8, 415: 3, 429: 8, 503: 14}
"""HTTP status -> the google.rpc.Status code OTLP's error bodies carry."""


def otlp_reply(ctype: str) -> Reply:
    def reply(status: int, code: str, message: str, headers: dict[str, str] | None) -> web.Response:
        return web.Response(status=status, body=otlp.status(GRPC_CODES.get(status, 2), f"{code}: {message}", ctype),
                            content_type=ctype, headers=headers)
    return reply


def _otlp_reply_of(request: web.Request) -> Reply:
    ctype = request.content_type
    return otlp_reply(ctype if ctype in (otlp.PROTOBUF, otlp.JSON) else otlp.JSON)


def answers_unavailable(handler: Handler, reply_of: Callable[[web.Request], Reply] = lambda _: error) -> Handler:
    """Dependencies down -> 503 with Retry-After (the sender retries); never a 5xx without one. ``reply_of``:
    the request's protocol's error answer (OTLP's is a google.rpc.Status)."""

    async def wrapped(self: Ingest, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except RetriableError as exc:
            return reply_of(request)(503, "unavailable", str(exc),
                                     {"Retry-After": str(max(1, int(exc.retry_after_s)))})
        except PipelineError as exc:
            log.error("%s failed: %s", request.path, exc)
            return reply_of(request)(503, "misconfigured", "the service is misconfigured; the operator has the "
                                                           "cause in the log", {"Retry-After": "30"})

    return wrapped


class Ingest:
    def __init__(self, ingest: IngestSettings, kafka: KafkaSettings, windows: WindowSettings, *, tokens: TokenStore,
                 dedup: FrameDedup, produce: Produce, counters: Counters, limits: Limits,
                 clock: Clock | None = None) -> None:
        """``kafka``: the topics produced to; ``windows``: the largest message a worker takes."""
        self.ingest, self.kafka, self.windows = ingest, kafka, windows
        self.tokens = tokens
        self.dedup = dedup
        self.produce = produce
        self.counters = counters
        self.limits = limits
        self.clock: Clock = clock or SystemClock()
        self.admission = Admission(ingest, self.limits, counters, clock=clock)
        self._background: set[asyncio.Task[None]] = set()

    async def _auth(self, request: web.Request, kind: str, *, reply: Reply = error,
                    where: str = "Authorization: Bearer <token>", query: bool = False) -> Any:
        # ?token= only for drains and language agents (they can send nothing else on some setups); a write
        # token in a query string would end up in access logs.
        token = bearer(request.headers, request.query if kind == "drain" or query else {})
        if not token:
            return reply(401, "missing_token", f"send a {kind} token: "
                                               f"{DRAIN_TOKEN_WHERE if kind == 'drain' else where}", None)
        info = await self.tokens.verify(token, kind)
        if info is None:
            return reply(403, "invalid_token", f"the token is unknown, revoked, or not a {kind} token", None)
        return info

    def _refused(self, refusal: Refusal, app: str, *, drain: bool, reply: Reply = error) -> web.Response:
        """Logplex drops a frame on any 4xx and retries a 5xx, so a throttled drain gets 503; HTTP callers 429."""
        self.counters.inc_app(refusal.counter, app)
        status = refusal.status or (503 if drain else refusal.api_status)
        resp = reply(status, refusal.code, refusal.message, {"Retry-After": str(refusal.retry_after_s)})
        resp.force_close()  # the rest of the body stays unread
        return resp

    @asynccontextmanager
    async def _admitted(self, request: web.Request, info: TokenInfo, *, drain: bool, reply: Reply = error
                        ) -> AsyncIterator[bytes | web.Response]:
        """The body, read under the app's and token's budgets (held until the block ends), or the refusal."""
        async with self.admission.request(info.app) as refusal:
            if refusal is not None:
                yield self._refused(refusal, info.app, drain=drain, reply=reply)
                return
            async with self.admission.body(request, info.app, info.id) as body:
                yield (self._refused(body, info.app, drain=drain, reply=reply) if isinstance(body, Refusal)
                       else body)

    async def _parse(self, app: str, body: bytes, parse: Callable[[bytes], T]) -> T:
        """In one of the process's parse slots, app by app. Small bodies are parsed inline (a thread hop costs
        more); large ones in a thread, so the loop keeps answering health checks and other tenants."""
        async with self.admission.slot(app):
            if len(body) <= self.ingest.parse_inline_bytes:
                return parse(body)
            return await asyncio.to_thread(parse, body)

    @answers_unavailable
    async def drain(self, request: web.Request) -> web.Response:
        info = await self._auth(request, "drain")
        if isinstance(info, web.Response):
            return info
        app = info.app
        count = request.headers.get("Logplex-Msg-Count")
        if count is not None and not (count.isascii() and count.isdigit() and len(count) <= 9):
            return error(400, "bad_msg_count", f"Logplex-Msg-Count {count[:20]!r} is not a number of messages")
        frame_id = request.headers.get("Logplex-Frame-Id")
        if frame_id is not None and len(frame_id) > 200:
            return error(400, "bad_frame_id", "Logplex-Frame-Id longer than 200 characters")
        async with self._admitted(request, info, drain=True) as body:
            if isinstance(body, web.Response):
                return body
            max_line = self.ingest.max_line_bytes
            try:
                frame = await self._parse(app, body, lambda b: logplex.parse_frame(b, app, max_line_bytes=max_line))
            except logplex.FrameError as exc:
                return error(400, "malformed_frame", str(exc))
            if count is not None and int(count) != frame.messages:
                return error(400, "msg_count_mismatch",
                             f"Logplex-Msg-Count is {count!r} but the frame holds {frame.messages} messages")
            if frame_id:
                claim = await self.dedup.claim(app, frame_id)
                if claim is Claim.DONE:
                    self.counters.inc("drain_frames_deduplicated")
                    return web.Response(status=204)
                if claim is Claim.BUSY:
                    return error(503, "frame_in_flight", "this frame is being delivered; retry",
                                 {"Retry-After": "2"})
            try:
                await self._deliver(app, frame, frame_id, drain_id(request.headers))
            except BaseException:
                if frame_id:
                    await self.dedup.release(app, frame_id)
                raise
            if frame_id:
                await self._complete(app, frame_id)
        self.counters.inc("drain_frames")
        self.counters.inc("drain_lines_ignored", frame.ignored)
        self.counters.inc("ingest_observations_produced", len(frame.encoded))
        return web.Response(status=204)

    async def _complete(self, app: str, key: str) -> None:
        """Marks a delivered frame (or idempotency key) done. Kafka has acknowledged it, so a store hiccup here
        must not answer 503 (the retry would count it twice once the lease ran out): retried in the
        background instead."""
        try:
            await self.dedup.complete(app, key)
        except RetriableError as exc:
            log.warning("marking %s delivered failed (%s); retrying in the background", key[:40], exc)
            task = asyncio.create_task(self._complete_later(app, key))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _complete_later(self, app: str, key: str) -> None:
        for delay_s in (0.5, 1, 2, 4, 8):
            await asyncio.sleep(delay_s)
            try:
                await self.dedup.complete(app, key)
                return
            except RetriableError:
                continue
            except PipelineError as exc:
                log.error("could not mark %s delivered (%s); a retry after its lease may count it twice",
                          key[:40], exc)
                return
        log.error("could not mark %s delivered; a retry after its lease may count it twice", key[:40])

    async def stop(self) -> None:
        """Cancel the background marks still retrying (before the dedup table they use is closed)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _deliver(self, app: str, frame: logplex.ParsedFrame, frame_id: str | None, drain: str | None) -> None:
        size = self.ingest.chunk_observations
        key = app.encode()
        records = [(key, b"[" + b",".join(frame.encoded[i:i + size]) + b"]")
                   for i in range(0, len(frame.encoded), size)]
        keep = self.ingest.max_dead_letters_per_request
        source = {"drain_frame": frame_id, "drain_id": drain}
        dead = [(key, orjson.dumps({"kind": "rejected", "reason": b.reason, "app": app, "record": b.line,
                                    "source": source})) for b in frame.bad[:keep]]
        if records:
            await self.produce(self.kafka.observations_topic, records)
        if dead:
            await self.produce(self.kafka.dlq_topic, dead)
        self.counters.inc("drain_lines_bad", len(frame.bad))
        self.counters.inc("ingest_dead_letters_dropped", len(frame.bad) - len(dead))

    @answers_unavailable
    async def observations(self, request: web.Request) -> web.Response:
        info = await self._auth(request, "write")
        if isinstance(info, web.Response):
            return info
        app = info.app
        idem = request.headers.get("Idempotency-Key")
        if idem is not None and not 1 <= len(idem) <= 200:
            return error(400, "bad_idempotency_key", "Idempotency-Key must be 1..200 characters")
        async with self._admitted(request, info, drain=False) as body:
            if isinstance(body, web.Response):
                return body
            max_rejects = MAX_REJECTS_RETURNED
            parsed = await self._parse(
                app, body, lambda b: parse_json_body(b, self.windows.max_message_bytes, max_rejects=max_rejects))
            if isinstance(parsed, models.Reject):
                return error(400, "malformed_body", parsed.reason)
            items, more_rejects = parsed
            good: list[Any] = []
            rejected: list[dict[str, Any]] = []
            for index, item in items:
                if isinstance(item, models.Reject):
                    reason = item.reason
                elif item.app != app:
                    reason = f"record is for app {item.app!r} but the token is for app {app!r}"
                else:
                    good.append(item)
                    continue
                if len(rejected) < max_rejects:
                    rejected.append({"index": index, "reason": reason})
                else:
                    more_rejects += 1
            n_rejected = len(rejected) + more_rejects
            more = {"rejected_not_listed": more_rejects} if more_rejects else {}
            if not good:
                if not rejected:
                    return json_response({"accepted": 0, "rejected": []})
                return json_response({"error": {"code": "no_valid_records",
                                                "message": "every record was rejected; see rejected"},
                                      "rejected": rejected, **more}, 400)
            if idem:
                claim = await self.dedup.claim(app, "idem:" + idem)
                if claim is Claim.DONE:
                    return json_response({"accepted": 0, "rejected": [], "duplicate": True},
                                         headers={"Idempotent-Replayed": "true"})
                if claim is Claim.BUSY:
                    return error(409, "request_in_flight", "a request with this Idempotency-Key is being "
                                                           "delivered; retry after the delay", {"Retry-After": "2"})
            try:
                await self.produce(self.kafka.observations_topic,
                                   chunks(app, good, self.ingest.chunk_observations))
            except BaseException:
                if idem:
                    await self.dedup.release(app, "idem:" + idem)
                raise
            if idem:
                await self._complete(app, "idem:" + idem)
        self.counters.inc("ingest_observations_produced", len(good))
        self.counters.inc("ingest_records_rejected", n_rejected)
        return json_response({"accepted": len(good), "rejected": rejected, **more})

    @functools.partial(answers_unavailable, reply_of=_otlp_reply_of)
    async def otlp_metrics(self, request: web.Request) -> web.Response:
        """OTLP/HTTP metrics: 200 (with ``partial_success`` when points were refused), 400 for a body that
        cannot be read, 429/503 with Retry-After to retry; every answer in the request's encoding."""
        ctype = request.content_type
        if ctype not in (otlp.PROTOBUF, otlp.JSON):
            return otlp_reply(otlp.JSON)(415, "unsupported_media_type",
                                         f"Content-Type {ctype!r}: send {otlp.PROTOBUF} or {otlp.JSON}", None)
        reply = otlp_reply(ctype)
        info = await self._auth(request, "write", reply=reply,
                                where="OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<token>")
        if isinstance(info, web.Response):
            return info
        app = info.app
        async with self._admitted(request, info, drain=False, reply=reply) as body:
            if isinstance(body, web.Response):
                return body
            names = self.limits.of(app).max_metric_names
            now_ms, future_ms = self.clock.now_ms(), self.windows.max_future_ms

            def parse(b: bytes) -> otlp.Mapped:
                return otlp.map_request(otlp.decode(b, ctype), app, now_ms=now_ms, max_future_ms=future_ms,
                                        max_metric_names=names)

            try:
                mapped = await self._parse(app, body, parse)
            except otlp.BodyError as exc:
                self.counters.inc_app("ingest_refused_bad_body", app)
                return reply(400, "malformed_body", str(exc), None)
            if mapped.observations:
                await self.produce(self.kafka.observations_topic,
                                   chunks(app, mapped.observations, self.ingest.chunk_observations))
        self.counters.inc("otlp_requests")
        self.counters.inc("ingest_observations_produced", len(mapped.observations))
        self.counters.inc("ingest_records_rejected", mapped.rejected)
        return web.Response(body=otlp.response(mapped, ctype), content_type=ctype)

    @answers_unavailable
    async def language_metrics(self, request: web.Request) -> web.Response:
        """A Heroku language agent's report for the dyno in the path (``HEROKU_METRICS_URL``). 200 when taken:
        the agents treat any other status as an error."""
        info = await self._auth(request, "write", query=True,
                                where=LANGUAGE_TOKEN_WHERE)
        if isinstance(info, web.Response):
            return info
        app, dyno = info.app, request.match_info["dyno"]
        if models.process_type(dyno) is None:
            return error(400, "bad_dyno", "the path ends with the dyno's name, as $DYNO gives it (web.1)")
        ts_ms = language.measured_at(request.headers.get("Measurements-Time"), self.clock.now_ms())
        if isinstance(ts_ms, str):
            return error(400, "bad_measurements_time", ts_ms)
        async with self._admitted(request, info, drain=False) as body:
            if isinstance(body, web.Response):
                return body
            try:
                report = await self._parse(app, body, lambda b: language.parse(b, app, dyno, ts_ms))
            except language.ReportError as exc:
                return error(400, "malformed_report", str(exc))
            if report.observations:
                await self.produce(self.kafka.observations_topic,
                                   chunks(app, report.observations, self.ingest.chunk_observations))
        self.counters.inc("language_reports")
        self.counters.inc("ingest_observations_produced", len(report.observations))
        self.counters.inc("ingest_records_rejected", len(report.rejected))
        return json_response({"accepted": len(report.observations), "rejected": report.rejected})


LANGUAGE_TOKEN_WHERE = ("HEROKU_METRICS_URL=https://x:TOKEN@host/v1/language-metrics/$DYNO (basic auth) or "
                        "https://host/v1/language-metrics/$DYNO?token=TOKEN")
MAX_REJECTS_RETURNED = 1000
"""Reasons listed in a JSON API answer; past it only counted (``rejected_not_listed``)."""
DRAIN_TOKEN_WHERE = ("put it in the drain URL, https://user:TOKEN@host/v1/drains/logplex (basic auth) or "
                     "https://host/v1/drains/logplex?token=TOKEN (Logplex-Drain-Token carries the drain's id, "
                     "never a token)")


def parse_json_body(body: bytes, max_bytes: int, *, max_rejects: int = MAX_REJECTS_RETURNED
                    ) -> tuple[list[tuple[int, Any]], int] | models.Reject:
    """A JSON array (or one object) or NDJSON -> ([(index, Observation | Reject)], rejects not listed): at
    most ``max_rejects`` rejects are described, so a body of a million bad elements stays small in memory."""
    head = body.lstrip()[:1]
    if head == b"[" or body.strip().count(b"\n") == 0:
        decoded = models.decode(body, max_bytes, max_rejects=max_rejects)
        if isinstance(decoded, models.Reject):
            return decoded
        return _indexed(decoded), decoded.more_rejects
    out: list[tuple[int, Any]] = []
    index = 0
    rejects = more = 0
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        d = models.decode(line, max_bytes, max_rejects=max(0, max_rejects - rejects))
        if isinstance(d, models.Reject):
            if rejects < max_rejects:
                out.append((index, d))
                rejects += 1
            else:
                more += 1
        else:
            out.extend((index, item) for _, item in _indexed(d))
            rejects += len(d.rejects)
            more += d.more_rejects
        index += 1
    return out, more


def _indexed(d: models.Decoded) -> list[tuple[int, Any]]:
    idx = d.indexes if d.indexes is not None else range(len(d.observations))
    out: list[tuple[int, Any]] = list(zip(idx, d.observations, strict=True))
    out.extend((r.index, r) for r in d.rejects)
    out.sort(key=lambda t: t[0])
    return out


def make_ingest_app(ingest: Ingest, settings: Settings, *, extra: Callable[[web.Application], None] | None = None
                    ) -> web.Application:
    webapp = web.Application(client_max_size=settings.ingest.max_body_bytes,
                             middlewares=[client_middleware(settings.web.forwarded_for_hops)])
    webapp.router.add_post("/v1/drains/logplex", ingest.drain)
    webapp.router.add_post("/v1/observations", ingest.observations)
    webapp.router.add_post("/v1/metrics", ingest.otlp_metrics)
    webapp.router.add_post("/v1/language-metrics/{dyno}", ingest.language_metrics)
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
    tokens = TokenStore(settings.web, table=FollowingTokens(settings, control.current), counters=counters)
    dedup = FrameDedup(settings.ingest, table=FollowingFrames(settings, control.current))
    producer = KafkaProducer(settings.kafka)
    limits = Limits(settings.limits)
    ingest = Ingest(settings.ingest, settings.kafka, settings.windows, tokens=tokens, dedup=dedup,
                    produce=producer.produce, counters=counters, limits=limits)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await limits.start()
        await control.start()
        await tokens.start()
        await dedup.start()
        await producer.start()
        yield
        await ingest.stop()
        await producer.stop()
        await dedup.stop()
        await tokens.stop()
        await control.stop()
        await limits.stop()

    from app.ops import health as ops

    checks = {
        "broker": ops.broker_check(settings.kafka.broker_url),
        "producer": ops.flag_check(lambda: producer.ready, message="the Kafka producer is not connected yet",
                                   action="check METRICS_BROKER_URL and that the brokers are reachable "
                                          "(it keeps retrying)"),
        "tokens": tokens.ping,
        "dedup": dedup.ping,
    }

    def stats_route(admin: web.Application) -> None:
        admin[COUNTERS_KEY] = counters
        admin.router.add_get("/v1/stats", get_stats)

    def admin(w: web.Application) -> None:  # /readyz with reasons, /metrics, /v1/stats: the admin port only
        ops.add_admin_port(w, settings.ops, counters=counters, checks=checks, routes=stats_route)

    webapp = make_ingest_app(ingest, settings, extra=admin)
    webapp.cleanup_ctx.append(lifecycle)
    return webapp
