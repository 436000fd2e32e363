"""HTTP API for monitors and autoscaling policies, per app (``/v1/apps/{app}/monitors``, ``/autoscaling``).

Writes become commands on ``policy-commands`` (acks=all): 201/200/204 when this worker applies them, else 202.
Reads come from the table of the worker that owns the app, forwarded there at most once. Webhook URLs are
redacted in reads. Authorization is a hook (:func:`token_authorizer`: read tokens look, write tokens change).
Reference: docs/alerting.md#where-configuration-lives
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, DummyCookieJar, web
from yarl import URL

from app import models
from app.alerting.autoscale import AppPolicies
from app.alerting.commands import (
    MONITOR_CREATE,
    MONITOR_DELETE,
    MONITOR_REPLACE,
    POLICY_DELETE,
    POLICY_PUT,
    Command,
    Outcome,
    Result,
)
from app.alerting.monitors import AppMonitors
from app.alerting.targets import redacted
from app.api.validation import ValidationError, parse_monitor, parse_policy, valid_monitor_id
from app.api.web import COUNTERS_KEY, RATE_KEY, error, json_response
from app.errors import PipelineError, RetriableError

log = logging.getLogger(__name__)

LOCAL = "local"
REMOTE = "remote"
UNKNOWN = "unknown"

Authorize = Callable[[web.Request, str], "bool | Awaitable[bool]"]
Send = Callable[[str, bytes], Awaitable[None]]
"""Produce a command (key = app) and return once the broker acknowledged it; RetriableError when down."""
Locate = Callable[[str], Awaitable["str | None"]]
"""The base URL of the worker that owns an app's partition; None while it is not known (partitions move)."""

FORWARDED_HEADER = "X-Minutely-Forwarded-By"
"""Set (to the sender's advertised URL) on a forwarded read: the receiver answers it itself, never forwards."""
FORWARDED_REQUEST_HEADERS = ("Authorization", "Accept", "If-None-Match", "If-Modified-Since")
RELAYED_HEADERS = ("Content-Type", "ETag", "Last-Modified", "Cache-Control", "Vary", "Retry-After",
                   "WWW-Authenticate", "Location")
"""End-to-end headers of the owner's answer passed to the client; hop-by-hop and encoding headers are not
(the body is relayed decoded, and its length is set again)."""


class CommandResults:
    """Outcomes of commands this process is waiting for, resolved by the agent that applies them."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}

    def expect(self, command_id: str) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = fut
        return fut

    def resolve(self, command_id: str, outcome: Outcome) -> None:
        fut = self._waiting.pop(command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def forget(self, command_id: str) -> None:
        self._waiting.pop(command_id, None)

    def __len__(self) -> int:
        return len(self._waiting)


def same_origin(a: str, b: str) -> bool:
    """Whether two base URLs name the same server (scheme, host, port; default ports made explicit)."""
    ua, ub = URL(a), URL(b)
    return (ua.scheme, (ua.host or "").lower(), ua.port) == (ub.scheme, (ub.host or "").lower(), ub.port)


_LOCAL_NAMES = ("localhost",)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class ForwardTargets:
    """Which advertised URLs a read may be forwarded to (security review L10): the URL comes from a consumer
    group member's assignment metadata, and the forward carries the client's ``Authorization`` header, so a
    group member advertising a host of its own would collect read tokens.

    ``allowed`` (``forward_allowed_suffix``): comma-separated DNS suffixes (``host == s`` or
    ``host.endswith("." + s)``) and/or IP networks (``10.0.0.0/8``, ``127.0.0.1``). Empty: derived from this
    worker's own advertised URL -- a name with a domain (the chart's ``<pod>.<headless service>.<namespace>.svc``)
    allows that domain (the headless Service's: only the StatefulSet's pods have names there); a bare hostname,
    loopback or IP (the local stack) allows only loopback, ``localhost`` and this host's own name.
    """

    def __init__(self, self_url: str, allowed: str = "") -> None:
        self.suffixes: tuple[str, ...] = ()
        self.networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self.names: tuple[str, ...] = ()
        entries = [e.strip().lower().strip(".") for e in allowed.split(",") if e.strip().strip(".")]
        if entries:
            nets, suffixes = [], []
            for e in entries:
                try:
                    nets.append(ipaddress.ip_network(e, strict=False))
                except ValueError:
                    suffixes.append(e)
            self.networks, self.suffixes = tuple(nets), tuple(suffixes)
            self.source = "forward_allowed_suffix"
            return
        host = (URL(self_url).host or "").lower().rstrip(".")
        if host and _ip(host) is None and "." in host:
            self.suffixes = (host.split(".", 1)[1],)
            self.source = f"the domain of this worker's advertised URL {self_url}"
        else:
            self.networks = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
            self.names = _LOCAL_NAMES + ((host,) if host and _ip(host) is None else ())
            self.source = f"loopback only (this worker's advertised URL {self_url} names no domain)"

    def allows(self, url: str) -> bool:
        try:
            u = URL(url)
        except ValueError:
            return False
        host = (u.host or "").lower().rstrip(".")
        if u.scheme not in ("http", "https") or not host or u.user is not None:
            return False
        ip = _ip(host)
        if ip is not None:
            return any(ip in net for net in self.networks if net.version == ip.version)
        return host in self.names or any(host == s or host.endswith("." + s) for s in self.suffixes)

    def describe(self) -> str:
        allowed = [*self.suffixes, *map(str, self.networks), *self.names]
        return f"{', '.join(allowed) or 'nothing'} ({self.source})"


class Forwarder:
    """Forwards a read to the worker that owns the app and relays its answer.

    Owns one HTTP session for the process's lifetime (:meth:`start` / :meth:`stop`): connections to the
    other workers are reused, and every forward is bounded by ``timeout_s`` (``connect_timeout_s`` to open
    a connection), so a stuck owner costs the client a 503 with Retry-After, not a hung request. Only owners
    whose URL :class:`ForwardTargets` allows are asked (``allowed``, or :meth:`allow_only` later); any other
    is refused with a 503 and logged, and never sees the client's credentials.
    """

    def __init__(self, *, self_url: str, timeout_s: float = 5.0, connect_timeout_s: float = 1.0,
                 allowed: str = "") -> None:
        self.self_url = self_url
        self.timeout = ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self.targets = ForwardTargets(self_url, allowed)
        self._session: ClientSession | None = None

    def allow_only(self, allowed: str) -> None:
        """Replace the allowed targets (``forward_allowed_suffix``; empty: keep the derived default)."""
        if allowed.strip():
            self.targets = ForwardTargets(self.self_url, allowed)

    async def start(self) -> None:
        if self._session is None:
            # No cookies, and no proxy from the environment: workers talk to each other directly.
            self._session = ClientSession(timeout=self.timeout, cookie_jar=DummyCookieJar(), trust_env=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def is_self(self, url: str) -> bool:
        return same_origin(url, self.self_url)

    async def forward(self, request: web.Request, owner_url: str) -> web.Response:
        """The owner's answer to the same method, path and query (with the client's credentials)."""
        if self._session is None:
            raise RuntimeError("Forwarder.forward before start()")
        if not self.targets.allows(owner_url):
            log.error("read %s %s not forwarded: its owner advertises %r, outside the allowed forward targets %s; "
                      "a consumer-group member may be misconfigured or hostile -- check the group's members, or "
                      "set METRICS_FORWARD_ALLOWED_SUFFIX", request.method, request.rel_url.path, owner_url[:200],
                      self.targets.describe())
            return error(503, "owner_unavailable", "the worker that evaluates this app cannot be reached from here; "
                                                   "retry shortly", {"Retry-After": "1"})
        target = URL(owner_url).join(request.rel_url)
        headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
        headers[FORWARDED_HEADER] = self.self_url
        try:
            async with self._session.request(request.method, target, headers=headers,
                                             allow_redirects=False) as resp:
                body = await resp.read()
                relayed = {h: v for h in RELAYED_HEADERS if (v := resp.headers.get(h)) is not None}
                return web.Response(status=resp.status, body=body or None, headers=relayed)
        except (TimeoutError, ClientError) as exc:
            log.warning("read %s %s not forwarded to its owner %s: %r", request.method, request.rel_url,
                        owner_url, exc)
            return error(503, "owner_unavailable", "the worker that evaluates this app did not answer; retry "
                                                   "shortly", {"Retry-After": "1"})


@dataclass
class PolicyBackend:
    """What the routes need from the worker: who owns an app, the local tables, the commands topic."""

    owner: Callable[[str], str]
    """LOCAL (this worker evaluates the app), REMOTE, or UNKNOWN (partitions are moving)."""
    monitors: Callable[[str], AppMonitors | None]
    policies: Callable[[str], AppPolicies | None]
    send: Send
    results: CommandResults
    apply_timeout_s: float = 5.0
    locate: Locate | None = None
    """Where another worker's app is read (its owner's advertised URL); with ``forwarder``."""
    forwarder: Forwarder | None = None


BACKEND_KEY: web.AppKey[PolicyBackend] = web.AppKey("policy_backend", PolicyBackend)
AUTHORIZE_KEY: web.AppKey[Authorize] = web.AppKey("policy_authorize")


def allow_all(request: web.Request, app: str) -> bool:
    return True


class TokenVerifier(Protocol):
    async def verify(self, token: str | None, kind: str, app: str | None = None) -> Any: ...


def token_authorizer(tokens: TokenVerifier, *, read_kind: str = "read", write_kind: str = "write") -> Authorize:
    """``authorize`` backed by the app's tokens (app/storage/tokens.py ``TokenStore``): reading monitors and
    policies needs one of the app's ``read_kind`` tokens, changing them one of its ``write_kind`` tokens,
    sent as ``Authorization: Bearer``."""
    from app.storage.tokens import bearer

    async def authorize(request: web.Request, app: str) -> bool:
        token = bearer(request.headers, {})  # not ?token=: query strings end up in access logs
        if not token:
            return False
        kind = read_kind if request.method in ("GET", "HEAD") else write_kind
        return await tokens.verify(token, kind, app) is not None
    return authorize


def add_policy_routes(webapp: web.Application, backend: PolicyBackend, *,
                      authorize: Authorize | None = None) -> None:
    webapp[BACKEND_KEY] = backend
    webapp[AUTHORIZE_KEY] = authorize or allow_all
    r = webapp.router
    r.add_get("/v1/apps/{app}/monitors", list_monitors)
    r.add_post("/v1/apps/{app}/monitors", create_monitor)
    r.add_get("/v1/apps/{app}/monitors/{monitor_id}", get_monitor)
    r.add_put("/v1/apps/{app}/monitors/{monitor_id}", replace_monitor)
    r.add_delete("/v1/apps/{app}/monitors/{monitor_id}", delete_monitor)
    r.add_get("/v1/apps/{app}/autoscaling", list_policies)
    r.add_get("/v1/apps/{app}/autoscaling/{process_type}", get_policy)
    r.add_put("/v1/apps/{app}/autoscaling/{process_type}", put_policy)
    r.add_delete("/v1/apps/{app}/autoscaling/{process_type}", delete_policy)


# --- common steps -----------------------------------------------------------------------------------------

class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


async def _app_of(request: web.Request) -> str:
    """The path's app, validated and authorized; raises _Refused with the answer otherwise."""
    app = request.match_info["app"]
    if not models.valid_app(app):
        raise _Refused(error(400, "invalid_app", "app must be 1..100 characters of [A-Za-z0-9._-]"))
    try:
        verdict = request.app[AUTHORIZE_KEY](request, app)
        allowed = await verdict if inspect.isawaitable(verdict) else verdict
    except RetriableError as exc:
        raise _Refused(error(503, "unavailable", "credentials cannot be checked right now; retry shortly",
                             {"Retry-After": str(max(1, int(exc.retry_after_s)))})) from None
    except PipelineError as exc:
        log.error("authorization failed: %s", exc)
        raise _Refused(error(503, "auth_error", "credentials cannot be checked; the operator has been logged "
                                                "the cause")) from None
    if not allowed:
        if "Authorization" not in request.headers:
            raise _Refused(error(401, "unauthorized", f"credentials for app {app!r} are required",
                                 {"WWW-Authenticate": "Bearer"}))
        raise _Refused(error(403, "forbidden", f"these credentials do not grant access to app {app!r}"))
    rate = request.app.get(RATE_KEY)  # the read API's per-app buckets, on a worker's web app
    if rate is not None:
        wait_s = rate.take(app)
        if wait_s is not None:
            request.app[COUNTERS_KEY].inc_app("query_refused_rate", app)
            raise _Refused(error(429, "rate_limited", f"app {app!r} is over its API request rate; retry after the "
                                                      "delay", {"Retry-After": str(wait_s)}))
    return app


def _rebalancing() -> _Refused:
    return _Refused(error(503, "rebalancing", "partitions are being reassigned; retry shortly",
                          {"Retry-After": "1"}))


async def _read_here(request: web.Request, backend: PolicyBackend, app: str) -> None:
    """Returns when this worker owns ``app`` and serves the read itself; otherwise raises _Refused with
    the answer: the owner's (forwarded once), 503 while ownership is unclear, or 421 without forwarding."""
    own = backend.owner(app)
    if own == LOCAL:
        return
    if own == UNKNOWN:
        raise _rebalancing()
    fwd = backend.forwarder
    if fwd is None or backend.locate is None:
        raise _Refused(error(421, "not_owner", f"app {app!r} is evaluated by another worker; send the request "
                                               "to that worker (route by app)"))
    if FORWARDED_HEADER in request.headers:
        # The sender's assignment says we own the app, ours says not: one of them is stale, and it settles
        # with the rebalance. Forwarding again could loop.
        raise _rebalancing()
    owner_url = await backend.locate(app)
    if owner_url is None or fwd.is_self(owner_url):
        raise _rebalancing()  # no URL yet, or the URL map is newer/older than the assignment
    raise _Refused(await fwd.forward(request, owner_url))


async def _body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _Refused(error(400, "invalid_json", f"request body is not JSON: {exc}")) from None


def _invalid(exc: ValidationError) -> web.Response:
    return json_response({"error": {"code": "invalid_field", "field": exc.field, "message": str(exc)}}, 400)


OUTCOME_STATUS = {Result.CREATED: 201, Result.REPLACED: 200, Result.DELETED: 204, Result.NOT_FOUND: 404,
                  Result.LIMIT_REACHED: 409, Result.IMMUTABLE: 400}
"""The answer to each result of applying a command."""
OUTCOME_ERROR_CODE = {Result.NOT_FOUND: "not_found", Result.LIMIT_REACHED: "too_many_monitors",
                      Result.IMMUTABLE: "immutable_field"}


def _outcome_response(outcome: Outcome, location: str | None = None) -> web.Response:
    status = OUTCOME_STATUS[outcome.result]
    if outcome.result is Result.DELETED:
        return web.Response(status=204)
    if not outcome.applied:
        return error(status, OUTCOME_ERROR_CODE[outcome.result], outcome.message)
    headers = {"Location": location} if location and outcome.result is Result.CREATED else None
    return json_response(outcome.value, status, headers)


async def _submit(backend: PolicyBackend, cmd: Command, *, wait: bool, location: str | None = None) -> web.Response:
    """Produce the command; answer with its outcome when it is applied here in time, else 202."""
    fut = backend.results.expect(cmd.id) if wait else None
    try:
        await backend.send(cmd.app, cmd.to_bytes())
    except RetriableError as exc:
        backend.results.forget(cmd.id)
        log.warning("policy command %s not sent: %s", cmd.id, exc)
        return error(503, "unavailable", "the message broker is unavailable; retry shortly",
                     {"Retry-After": str(max(1, int(exc.retry_after_s)))})
    if fut is not None:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), timeout=backend.apply_timeout_s)
            return _outcome_response(outcome, location)
        except TimeoutError:
            backend.results.forget(cmd.id)
    return json_response({"status": "accepted", "command_id": cmd.id,
                          "message": "the change is stored and will be applied by the worker that evaluates "
                                     "this app"}, 202)


def _handler(fn: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await fn(request)
        except _Refused as r:
            return r.response
    wrapped.__name__ = fn.__name__
    return wrapped


# --- monitors ------------------------------------------------------------------------------------------------

def _monitor_id(request: web.Request) -> str:
    monitor_id = request.match_info["monitor_id"]
    if not valid_monitor_id(monitor_id):
        raise _Refused(error(404, "not_found", f"no monitor {monitor_id!r}"))
    return monitor_id


@_handler
async def list_monitors(request: web.Request) -> web.Response:
    app = await _app_of(request)
    backend = request.app[BACKEND_KEY]
    await _read_here(request, backend, app)
    doc = backend.monitors(app)
    monitors = [] if doc is None else [redacted(m.public()) for m in doc.monitors.values()]
    return json_response({"app": app, "monitors": monitors})


@_handler
async def get_monitor(request: web.Request) -> web.Response:
    app = await _app_of(request)
    monitor_id = _monitor_id(request)
    backend = request.app[BACKEND_KEY]
    await _read_here(request, backend, app)
    doc = backend.monitors(app)
    m = None if doc is None else doc.monitors.get(monitor_id)
    if m is None:
        return error(404, "not_found", f"no monitor {monitor_id!r}")
    return json_response(redacted(m.public()))


@_handler
async def create_monitor(request: web.Request) -> web.Response:
    app = await _app_of(request)
    backend = request.app[BACKEND_KEY]
    body = await _body(request)
    monitor_id = f"mon_{uuid.uuid4().hex[:12]}"
    try:
        config = parse_monitor(body, monitor_id=monitor_id)
    except ValidationError as exc:
        return _invalid(exc)
    own = backend.owner(app)
    cmd = Command(uuid.uuid4().hex, MONITOR_CREATE, app, monitor=config)
    return await _submit(backend, cmd, wait=own != REMOTE, location=f"/v1/apps/{app}/monitors/{monitor_id}")


@_handler
async def replace_monitor(request: web.Request) -> web.Response:
    app = await _app_of(request)
    monitor_id = _monitor_id(request)
    backend = request.app[BACKEND_KEY]
    body = await _body(request)
    try:
        config = parse_monitor(body, monitor_id=monitor_id)
    except ValidationError as exc:
        return _invalid(exc)
    own = backend.owner(app)
    if own == LOCAL:
        doc = backend.monitors(app)
        if doc is None or monitor_id not in doc.monitors:
            return error(404, "not_found", f"no monitor {monitor_id!r}")
    cmd = Command(uuid.uuid4().hex, MONITOR_REPLACE, app, monitor=config)
    return await _submit(backend, cmd, wait=own != REMOTE)


@_handler
async def delete_monitor(request: web.Request) -> web.Response:
    app = await _app_of(request)
    monitor_id = _monitor_id(request)
    backend = request.app[BACKEND_KEY]
    own = backend.owner(app)
    if own == LOCAL:
        doc = backend.monitors(app)
        if doc is None or monitor_id not in doc.monitors:
            return error(404, "not_found", f"no monitor {monitor_id!r}")
    cmd = Command(uuid.uuid4().hex, MONITOR_DELETE, app, monitor_id=monitor_id)
    return await _submit(backend, cmd, wait=own != REMOTE)


# --- autoscaling policies -------------------------------------------------------------------------------------

def _process_type(request: web.Request) -> str:
    proc = request.match_info["process_type"]
    if not models.valid_app(proc):
        raise _Refused(error(400, "invalid_process_type", "process_type must be 1..100 characters of "
                                                          "[A-Za-z0-9._-]"))
    return proc


@_handler
async def list_policies(request: web.Request) -> web.Response:
    app = await _app_of(request)
    backend = request.app[BACKEND_KEY]
    await _read_here(request, backend, app)
    doc = backend.policies(app)
    policies = [] if doc is None else [redacted(a.public()) for a in doc.policies.values()]
    return json_response({"app": app, "policies": policies})


@_handler
async def get_policy(request: web.Request) -> web.Response:
    app = await _app_of(request)
    proc = _process_type(request)
    backend = request.app[BACKEND_KEY]
    await _read_here(request, backend, app)
    doc = backend.policies(app)
    a = None if doc is None else doc.policies.get(proc)
    if a is None:
        return error(404, "not_found", f"no autoscaling policy for {proc!r}")
    return json_response(redacted(a.public()))


@_handler
async def put_policy(request: web.Request) -> web.Response:
    app = await _app_of(request)
    proc = _process_type(request)
    backend = request.app[BACKEND_KEY]
    body = await _body(request)
    try:
        config = parse_policy(body, process_type=proc)
    except ValidationError as exc:
        return _invalid(exc)
    own = backend.owner(app)
    cmd = Command(uuid.uuid4().hex, POLICY_PUT, app, policy=config)
    return await _submit(backend, cmd, wait=own != REMOTE, location=f"/v1/apps/{app}/autoscaling/{proc}")


@_handler
async def delete_policy(request: web.Request) -> web.Response:
    app = await _app_of(request)
    proc = _process_type(request)
    backend = request.app[BACKEND_KEY]
    own = backend.owner(app)
    if own == LOCAL:
        doc = backend.policies(app)
        if doc is None or proc not in doc.policies:
            return error(404, "not_found", f"no autoscaling policy for {proc!r}")
    cmd = Command(uuid.uuid4().hex, POLICY_DELETE, app, process_type=proc)
    return await _submit(backend, cmd, wait=own != REMOTE)
