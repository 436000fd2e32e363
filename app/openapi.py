"""The OpenAPI 3.1 document of the read API, served at ``GET /v1/openapi.json``.

Written by hand next to the handlers (app/web.py) and checked against them by tests/test_web.py.
"""

from __future__ import annotations

from typing import Any

from app.query import RESOLUTION_NAMES, RESOLUTIONS
from app.settings import Settings

OPENAPI_PATH = "/v1/openapi.json"

_ERROR_CODES = ["unauthorized", "invalid_token", "not_found", "invalid_app", "invalid_process_type",
                "invalid_range", "invalid_resolution", "range_too_large", "too_many_points", "unavailable",
                "store_error"]


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _num(nullable: bool = True) -> dict[str, Any]:
    return {"type": ["number", "null"]} if nullable else {"type": "number"}


def document(settings: Settings) -> dict[str, Any]:
    stats_obj = {"type": "object", "additionalProperties": _num()}
    point = {
        "type": "object",
        "required": ["ts"],
        "description": "One bucket. A section is absent when the bucket had no data of that kind. Coarser "
                       "buckets merge the minutes' t-digests (percentiles are not averaged).",
        "properties": {
            "ts": {"type": "integer", "description": "bucket start, epoch seconds"},
            "requests": {"type": "integer"},
            "response_ms": {"type": "object", "properties": {k: _num() for k in ("p50", "p95", "p99", "max", "mean")}},
            "status": {"type": "object", "description": "requests per status class (1xx..5xx), classes with 0 omitted",
                       "additionalProperties": {"type": "integer"}},
            "failed": {"type": "integer", "description": "requests with status >= 500"},
            "errors": {"type": "object", "description": "router errors by code (H12, H13, ...)",
                       "additionalProperties": {"type": "integer"}},
            "memory_mb": {"type": "object", "properties": {
                k: _num() for k in ("rss_mean", "rss_max", "swap_mean", "swap_max", "total_mean", "total_max",
                                    "quota")}},
            "load": {"type": "object", "properties": {"mean": _num(), "max": _num()}},
            "metrics": {"type": "object", "description": "custom metrics by name", "additionalProperties": stats_obj},
        },
    }
    auth_responses = {
        "401": _error("no token, or not a live read token (`unauthorized`, `invalid_token`)"),
        "404": _error("`not_found`: the app does not exist or the token is for another app (the same answer)"),
        "503": _error("`unavailable` (with Retry-After) or `store_error`: DynamoDB cannot answer now"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "minutely metrics API", "version": "1.0.0",
                 "description": "Per-app metrics at 1 min, 10 min, 1 h and 2 h resolution, retained "
                                f"{settings.ttl_days:g} days. Authenticate with a per-app read token "
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
                                           "points": {"type": "array", "items": {"$ref": "#/components/schemas/Point"}}}},
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
                    {"name": "process_type", "in": "query", "schema": {"type": "string", "default": "web"}},
                    {"name": "since", "in": "query", "description": "epoch seconds (default: until - 1 h); "
                     "rounded down to the resolution", "schema": {"type": "integer"}},
                    {"name": "until", "in": "query", "description": "epoch seconds, exclusive (default: now, "
                     "including the open minute); rounded up to the resolution", "schema": {"type": "integer"}},
                    {"name": "resolution", "in": "query",
                     "description": "auto (default: 1 min up to 2 h, 10 min below 72 h, 1 h below 7 d, else 2 h), "
                                    "seconds, or a name",
                     "schema": {"type": "string", "enum": ["auto", *RESOLUTION_NAMES,
                                                           *(str(r) for r in RESOLUTIONS)]}},
                ],
                "responses": {
                    "200": {"description": "points; ETag and Cache-Control set (closed buckets are immutable)",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Metrics"}}}},
                    "304": {"description": "If-None-Match matched the current ETag"},
                    "400": _error(f"bad parameter, range over the {settings.ttl_days:g}-day retention "
                                  f"(`range_too_large`) or more than {settings.max_query_points} points "
                                  "(`too_many_points`)"),
                    **auth_responses,
                }}},
            "/v1/whoami": {"get": {
                "operationId": "whoami", "summary": "The app a read token grants",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "the token's app",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {"app": {"type": "string"},
                                                                           "kind": {"type": "string"}}}}}},
                              "401": auth_responses["401"], "503": auth_responses["503"]}}},
            "/v1/stats": {"get": {"operationId": "stats", "summary": "Pipeline counters with help texts",
                                  "responses": {"200": {"description": "counters"}}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness",
                                 "responses": {"200": {"description": "alive"}}}},
            "/dashboard/": {"get": {"operationId": "dashboard", "summary": "The metrics dashboard (HTML)",
                                    "responses": {"200": {"description": "HTML page"}}}},
            OPENAPI_PATH: {"get": {"operationId": "openapi", "summary": "This document",
                                   "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}},
        },
    }
