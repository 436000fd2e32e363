"""The OpenAPI 3.1 document of the read API, served at ``GET /v1/openapi.json``.

Written by hand next to the handlers (app/api/web.py) and checked against them by tests/api/test_web.py.
"""

from __future__ import annotations

from typing import Any

from app.api.query import RESOLUTION_NAMES
from app.settings import Settings
from tables.aggregate import RESOLUTIONS

OPENAPI_PATH = "/v1/openapi.json"

_ERROR_CODES = ["unauthorized", "invalid_token", "not_found", "invalid_app", "invalid_process_type",
                "invalid_range", "invalid_resolution", "range_too_large", "too_many_points", "unavailable",
                "store_error", "rate_limited", "overloaded", "timeout"]


_EPOCH = {"type": "integer", "minimum": 0, "maximum": 10**11}
"""since/until: epoch seconds, bounded as app/api/web.py checks them (MAX_EPOCH_S)."""


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _num(nullable: bool = True) -> dict[str, Any]:
    return {"type": ["number", "null"]} if nullable else {"type": "number"}


def _event_schemas() -> dict[str, Any]:
    common = {"kind": {"type": "string", "enum": ["alert", "autoscale"]},
              "id": {"type": "string", "description": "the producer's event_id (deterministic)"},
              "ts": {"type": "integer", "description": "start of the minute the event is about, epoch seconds"}}
    return {
        "Event": {"oneOf": [
            {"type": "object", "title": "alert", "required": ["kind", "id", "ts", "status"],
             "properties": {**common, "status": {"type": "string", "enum": ["firing", "still_firing", "resolved"]},
                            "monitor_id": {"type": "string"},
                            "metric": {"type": "string", "enum": ["LATENCY", "ERROR_RATE"]},
                            "value": _num(), "threshold": _num()}},
            {"type": "object", "title": "autoscale", "required": ["kind", "id", "ts", "from_dynos", "to_dynos"],
             "description": "a decision that changed the dyno count (holds are not stored)",
             "properties": {**common, "action": {"type": "string", "enum": ["up", "down"]},
                            "from_dynos": {"type": "integer"}, "to_dynos": {"type": "integer"},
                            "reason": {"type": "string"}, "pinned_at_max": {"type": "boolean"}}},
        ]},
        "Events": {"type": "object", "required": ["app", "process_type", "since", "until", "events"],
                   "properties": {"app": {"type": "string"}, "process_type": {"type": "string"},
                                  "since": {"type": "integer"}, "until": {"type": "integer"},
                                  "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}},
    }


def document(settings: Settings) -> dict[str, Any]:
    stats_obj = {"type": "object", "additionalProperties": _num()}
    point = {
        "type": "object",
        "required": ["ts"],
        "description": "One bucket. A section is absent when the bucket had no data of that kind. Coarser "
                       "buckets merge the minutes' t-digests (percentiles are not averaged).",
        "properties": {
            "ts": {"type": "integer", "description": "bucket start, epoch seconds"},
            "requests": {"type": "integer", "description": "every request, including router errors no dyno "
                                                           "served (H10, H14, ...)"},
            "response_ms": {"type": "object", "description": "over the requests with a service time only; absent "
                            "when none had one", "properties": {k: _num() for k in ("p50", "p95", "p99", "max",
                                                                                      "min", "mean")}},
            "status": {"type": "object", "description": "requests per status class (1xx..5xx), classes with 0 omitted",
                       "additionalProperties": {"type": "integer"}},
            "failed": {"type": "integer", "description": "requests with status >= 500"},
            "errors": {"type": "object", "description": "router errors by code (H12, H13, ...)",
                       "additionalProperties": {"type": "integer"}},
            "memory_mb": {"type": "object", "properties": {
                k: _num() for k in ("rss_mean", "rss_max", "swap_mean", "swap_max", "total_mean", "total_max",
                                    "quota")}},
            "load": {"type": "object", "properties": {"mean": _num(), "max": _num()}},
            "metrics": {"type": "object", "description": "custom metrics by name (l2met count#/measure#/sample# "
                        "lines, OTLP points and language agents' reports become counter/timer/gauge)",
                        "additionalProperties": stats_obj},
            "platform": {"type": "object", "description": "platform events in the bucket by name: crash, restart, "
                         "stop, exit, scale, R10..R99 (this process type's dynos); release (process type `app`)",
                         "additionalProperties": {"type": "integer"}},
            "addons": {"type": "object", "description": "process type `app` only: add-on metrics by source "
                       "(DATABASE, REDIS, ...), each sample's mean/max/last; sizes in MB",
                       "additionalProperties": {"type": "object", "additionalProperties": {
                           "type": "object", "properties": {"mean": _num(), "max": _num(), "last": _num()}}}},
        },
    }
    auth_responses = {
        "401": _error("no token, or not a live read token (`unauthorized`, `invalid_token`)"),
        "404": _error("`not_found`: the app does not exist or the token is for another app (the same answer)"),
        "429": {**_error("`rate_limited`: the app is over its read API rate (per app, all its tokens; 304s "
                         "count); retry after Retry-After seconds"),
                "headers": {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}}},
        "503": _error("`unavailable` (with Retry-After) or `store_error`: DynamoDB cannot answer now; "
                      "`overloaded` (with Retry-After): too many queries computing at once here"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "minutely metrics API", "version": "1.0.0",
                 "description": "Per-app metrics at 1 min, 10 min, 1 h and 2 h resolution, retained "
                                f"{settings.storage.ttl_days:g} days. Authenticate with a per-app read token "
                                "(`python -m app tokens create --app APP --kind read`) as a Bearer token."},
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string", "enum": _ERROR_CODES},
                                   "message": {"type": "string"}}}}},
                "Point": point,
                "Metrics": {"type": "object", "required": ["app", "process_type", "resolution_s", "since",
                                                           "until", "points"],
                            "properties": {"app": {"type": "string"}, "process_type": {"type": "string"},
                                           "resolution_s": {"type": "integer", "enum": list(RESOLUTIONS)},
                                           "since": {"type": "integer"}, "until": {"type": "integer"},
                                           "points": {"type": "array",
                                                      "items": {"$ref": "#/components/schemas/Point"}}}},
                **_event_schemas(),
            },
        },
        "paths": {
            "/v1/apps/{app}/metrics": {"get": {
                "operationId": "getMetrics",
                "summary": "Points of one app and process type, oldest first",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "app", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"}},
                    {"name": "process_type", "in": "query", "schema": {"type": "string", "default": "web"},
                     "description": "web, worker, ...; `app` for add-on metrics and releases"},
                    {"name": "since", "in": "query", "description": "epoch seconds (default: until - 1 h); "
                     "rounded down to the resolution", "schema": _EPOCH},
                    {"name": "until", "in": "query", "description": "epoch seconds, exclusive (default: now, "
                     "including the open minute); rounded up to the resolution", "schema": _EPOCH},
                    {"name": "resolution", "in": "query",
                     "description": "auto (default: 1 min up to 2 h, 10 min below 72 h, 1 h below 7 d, else 2 h), "
                                    "seconds, or a name",
                     "schema": {"type": "string", "enum": ["auto", *RESOLUTION_NAMES,
                                                           *(str(r) for r in RESOLUTIONS)]}},
                ],
                "responses": {
                    "200": {"description": "points. Every answer is `Cache-Control: private, no-cache` with an "
                                           "ETag: revalidate, even a final answer changes when a late minute is "
                                           "stored",
                            "headers": {"X-Final": {
                                "description": "`true` when every bucket of the range is stored (at or before "
                                               "the stored-through watermark, and settled): no point will "
                                               "change but for a late minute; `false` while any is live",
                                "schema": {"type": "string", "enum": ["true", "false"]}}},
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Metrics"}}}},
                    "304": {"description": "If-None-Match matched the current ETag"},
                    "400": _error(f"bad parameter, range over the {settings.storage.ttl_days:g}-day retention "
                                  f"(`range_too_large`) or more than {settings.query.max_points} points "
                                  "(`too_many_points`)"),
                    **auth_responses,
                }}},
            "/v1/apps/{app}/events": {"get": {
                "operationId": "getEvents",
                "summary": "Alert transitions and autoscaling steps of one app and process type, oldest first "
                           "(the dashboard's markers)",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "app", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"}},
                    {"name": "process_type", "in": "query", "schema": {"type": "string", "default": "web"}},
                    {"name": "since", "in": "query", "description": "epoch seconds (default: until - 1 h)",
                     "schema": _EPOCH},
                    {"name": "until", "in": "query", "description": "epoch seconds, exclusive (default: now + 1 min)",
                     "schema": _EPOCH},
                ],
                "responses": {
                    "200": {"description": "events with since <= ts < until; Cache-Control: private, no-cache",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Events"}}}},
                    "400": _error(f"bad parameter or range over {settings.query.events_max_range_days:g} days "
                                  "(`range_too_large`: events are read uncached)"),
                    **auth_responses,
                }}},
            "/v1/whoami": {"get": {
                "operationId": "whoami", "summary": "The app a read token grants",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "the token's app",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {"app": {"type": "string"},
                                                                           "kind": {"type": "string"}}}}}},
                              "401": auth_responses["401"], "429": auth_responses["429"],
                              "503": auth_responses["503"]}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness",
                                 "responses": {"200": {"description": "alive"}}}},
            "/dashboard/": {"get": {"operationId": "dashboard", "summary": "The metrics dashboard (HTML)",
                                    "responses": {"200": {"description": "HTML page"}}}},
            OPENAPI_PATH: {"get": {"operationId": "openapi", "summary": "This document",
                                   "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}},
        },
    }


# --- monitors and autoscaling policies (app/api/policies.py), served by workers only ----------------------------

_POLICY_ERROR_CODES = ["invalid_app", "invalid_process_type", "invalid_json", "invalid_field", "immutable_field",
                       "too_many_monitors", "not_found", "unauthorized", "forbidden", "not_owner", "rebalancing",
                       "owner_unavailable", "unavailable", "auth_error", "rate_limited"]


def _policy_schemas() -> dict[str, Any]:
    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    targets_in = {
        "email": {"type": "array", "maxItems": 10, "items": {"type": "string", "format": "email"}},
        "webhooks": {"type": "array", "maxItems": 5, "items": {
            "type": "object", "required": ["url", "secret"], "additionalProperties": False,
            "properties": {"url": {"type": "string", "format": "uri", "maxLength": 2048},
                           "secret": {"type": "string", "minLength": 16, "maxLength": 256,
                                      "description": "HMAC-SHA256 key of X-Minutely-Signature; never read back"}}}},
    }
    targets_out = {
        "email": {"type": "array", "items": {"type": "string"}},
        "webhooks": {"type": "array", "items": {"type": "object", "properties": {
            "url": {"type": "string"}, "secret_set": {"type": "boolean", "const": True}}}},
    }
    monitor_fields = {
        "process_type": {"type": "string", "default": "web", "pattern": "^[A-Za-z0-9._-]{1,100}$"},
        "metric": {"type": "string", "enum": ["LATENCY", "ERROR_RATE"]},
        "threshold": {"type": "number", "description": "LATENCY: p95 in ms (50..300000); ERROR_RATE: fraction of "
                                                       "requests with status >= 500 (0.005..1)"},
        "sensitivity_min": {"type": "integer", "enum": [1, 5, 10],
                            "description": "consecutive minutes the condition must hold"},
        "notify_every_min": {"type": "integer", "enum": [5, 60, 1440],
                             "description": "reminders while firing, at most this often"},
    }
    policy_fields = {
        "min_dynos": {"type": "integer", "minimum": 1},
        "max_dynos": {"type": "integer", "maximum": 1000, "description": "min_dynos..1000"},
        "p95_target_ms": {"type": "number", "minimum": 50, "maximum": 300000},
        "current_dynos": {"type": ["integer", "null"], "minimum": 0, "maximum": 1000,
                          "description": "the count running now (default: the last decision's, or min_dynos)"},
    }
    nullable_int = {"type": ["integer", "null"]}
    return {
        "PolicyError": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string", "enum": _POLICY_ERROR_CODES},
                           "field": {"type": "string", "description": "with invalid_field: the field at fault"},
                           "message": {"type": "string"}}}}},
        "MonitorInput": {"type": "object", "additionalProperties": False,
                         "required": ["metric", "threshold", "sensitivity_min", "notify_every_min"],
                         "properties": {**monitor_fields, **targets_in}},
        "Monitor": {"type": "object", "required": ["id", "process_type", "metric", "threshold", "sensitivity_min",
                                                   "notify_every_min", "email", "webhooks", "state"],
                    "properties": {"id": {"type": "string", "pattern": "^mon_[0-9a-f]{12}$"}, **monitor_fields,
                                   **targets_out,
                                   "state": {"type": "object", "properties": {
                                       "status": {"type": "string", "enum": ["ok", "firing", "resolved"]},
                                       "streak_min": {"type": "integer"},
                                       "last_minute_ms": {"type": "integer", "description": "-1: none yet"},
                                       "firing_since_ms": nullable_int, "last_notified_ms": nullable_int,
                                       "last_value": _num()}}}},
        "Monitors": {"type": "object", "required": ["app", "monitors"],
                     "properties": {"app": {"type": "string"}, "monitors": {"type": "array", "items": ref("Monitor")}}},
        "AutoscalingInput": {"type": "object", "additionalProperties": False,
                             "required": ["min_dynos", "max_dynos", "p95_target_ms"],
                             "properties": {**policy_fields, **targets_in}},
        "Autoscaling": {"type": "object", "required": ["process_type", "min_dynos", "max_dynos", "p95_target_ms",
                                                       "state"],
                        "properties": {"process_type": {"type": "string"}, **policy_fields, **targets_out,
                                       "state": {"type": "object", "properties": {
                                           "dynos": {"type": "integer"}, "last_minute_ms": {"type": "integer"},
                                           "last_step_ms": nullable_int, "down_streak_min": {"type": "integer"},
                                           "pinned_notified_ms": nullable_int}}}},
        "AutoscalingList": {"type": "object", "required": ["app", "policies"],
                            "properties": {"app": {"type": "string"},
                                           "policies": {"type": "array", "items": ref("Autoscaling")}}},
        "Accepted": {"type": "object", "required": ["status", "command_id"],
                     "properties": {"status": {"type": "string", "const": "accepted"},
                                    "command_id": {"type": "string"}, "message": {"type": "string"}}},
    }


def _policy_paths() -> dict[str, Any]:
    def err(description: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PolicyError"}}}}

    def ok(description: str, schema: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}

    def body(schema: str) -> dict[str, Any]:
        return {"required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}

    app = {"name": "app", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,100}$"}}
    mid = {"name": "monitor_id", "in": "path", "required": True, "schema": {"type": "string"}}
    proc = {"name": "process_type", "in": "path", "required": True, "schema": {"type": "string"}}
    common = {
        "400": err("invalid_app, invalid_process_type, invalid_json, invalid_field (names the field) or "
                   "immutable_field"),
        "401": err("no Authorization header (`unauthorized`)"),
        "403": err("the token is not one of this app's tokens of the needed kind (`forbidden`)"),
        "429": {**err("`rate_limited`: the app is over its API request rate (the read API's, shared); retry "
                      "after Retry-After seconds"),
                "headers": {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}}},
        "503": err("with Retry-After: partitions are moving (`rebalancing`), the owning worker did not answer "
                   "(`owner_unavailable`), or the broker or the credential store is down"),
    }
    read = {**common, "421": err("`not_owner`: only when this worker cannot forward reads")}
    accepted = ok("accepted by another worker than the app's: applied shortly", "Accepted")
    read_note = ("Needs one of the app's read tokens. Any worker answers: reads of an app another worker "
                 "evaluates are forwarded to it once and its answer relayed (ETag and Content-Type included).")
    write_note = ("Needs one of the app's write tokens. The change is a command applied by the worker that "
                  "evaluates the app; another worker answers 202.")
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "/v1/apps/{app}/monitors": {
            "parameters": [app],
            "get": {"operationId": "listMonitors", "summary": "The app's monitors with their state",
                    "description": read_note, "security": security,
                    "responses": {"200": ok("the monitors", "Monitors"), **read}},
            "post": {"operationId": "createMonitor", "summary": "Create a monitor (at most "
                                                                "METRICS_MAX_MONITORS_PER_APP per app)",
                     "description": write_note, "security": security, "requestBody": body("MonitorInput"),
                     "responses": {"201": ok("created; Location names it", "Monitor"), "202": accepted,
                                   "409": err("`too_many_monitors`"), **common}}},
        "/v1/apps/{app}/monitors/{monitor_id}": {
            "parameters": [app, mid],
            "get": {"operationId": "getMonitor", "summary": "One monitor with its state", "description": read_note,
                    "security": security,
                    "responses": {"200": ok("the monitor", "Monitor"), "404": err("`not_found`"), **read}},
            "put": {"operationId": "replaceMonitor",
                    "summary": "Replace the definition; the state is kept (metric and process_type cannot change)",
                    "description": write_note, "security": security, "requestBody": body("MonitorInput"),
                    "responses": {"200": ok("replaced", "Monitor"), "202": accepted, "404": err("`not_found`"),
                                  **common}},
            "delete": {"operationId": "deleteMonitor",
                       "summary": "Delete a monitor; a firing one is resolved first (a `resolved` event with "
                                  "reason `monitor_deleted`)",
                       "description": write_note, "security": security,
                       "responses": {"204": {"description": "deleted"}, "202": accepted, "404": err("`not_found`"),
                                     **common}}},
        "/v1/apps/{app}/autoscaling": {
            "parameters": [app],
            "get": {"operationId": "listAutoscaling", "summary": "The app's autoscaling policies with their state",
                    "description": read_note, "security": security,
                    "responses": {"200": ok("the policies", "AutoscalingList"), **read}}},
        "/v1/apps/{app}/autoscaling/{process_type}": {
            "parameters": [app, proc],
            "get": {"operationId": "getAutoscaling", "summary": "One process type's policy with its state",
                    "description": read_note, "security": security,
                    "responses": {"200": ok("the policy", "Autoscaling"), "404": err("`not_found`"), **read}},
            "put": {"operationId": "putAutoscaling", "summary": "Create or replace the policy (process type web)",
                    "description": write_note, "security": security, "requestBody": body("AutoscalingInput"),
                    "responses": {"201": ok("created; Location names it", "Autoscaling"),
                                  "200": ok("replaced", "Autoscaling"), "202": accepted, **common}},
            "delete": {"operationId": "deleteAutoscaling", "summary": "Delete the policy",
                       "description": write_note, "security": security,
                       "responses": {"204": {"description": "deleted"}, "202": accepted, "404": err("`not_found`"),
                                     **common}}},
    }


def with_policy_routes(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (from :func:`document`) with the monitors and autoscaling routes, for the workers, which serve
    them (the ``web`` role does not, so its document leaves them out)."""
    return {**doc,
            "components": {**doc["components"], "schemas": {**doc["components"]["schemas"], **_policy_schemas()}},
            "paths": {**doc["paths"], **_policy_paths()}}
