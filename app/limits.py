"""Per-tenant limits, Mimir-style: a default for every limit, per-app overrides an operator changes without
a restart.

Defaults come from the settings (``METRICS_LIMIT_*``). Overrides live in a YAML (or JSON) file named by
``METRICS_LIMITS_FILE``, re-read every ``METRICS_LIMITS_RELOAD_S`` when its modification time changes (on
Kubernetes: a ConfigMap mounted as a file, which the kubelet updates in place)::

    overrides:
      shop:                        # the app
        ingest_rate_bytes_s: 8000000
        max_process_types: 200
        query_rate_per_s: 50       # read API requests/s (app/api/web.py)

A file that cannot be read or has an unknown limit keeps the overrides in force and is logged with the line
to fix; it never stops a process nor resets a tenant to the defaults silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import yaml

from app.errors import ConfigError
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppLimits:
    """One app's limits; see the settings of the same names (``limit_*``) for what each bounds."""

    ingest_rate_bytes_s: float
    ingest_burst_bytes: int
    inflight_bytes_per_token: int
    max_process_types: int
    max_addon_sources: int
    max_metric_names: int
    # Defaulted, so an AppLimits built by hand for the ingest side (tables/windows.py) need not name them.
    query_rate_per_s: float = Settings.limit_query_rate_per_s
    query_burst: int = Settings.limit_query_burst

    @classmethod
    def defaults(cls, settings: Settings) -> "AppLimits":
        return cls(ingest_rate_bytes_s=settings.limit_ingest_rate_bytes_s,
                   ingest_burst_bytes=settings.limit_ingest_burst_bytes,
                   inflight_bytes_per_token=settings.limit_inflight_bytes_per_token,
                   max_process_types=settings.limit_process_types,
                   max_addon_sources=settings.limit_addon_sources,
                   max_metric_names=settings.max_metric_names,
                   query_rate_per_s=settings.limit_query_rate_per_s,
                   query_burst=settings.limit_query_burst)


LIMIT_NAMES = tuple(f.name for f in fields(AppLimits))


def parse_overrides(doc: Any, defaults: AppLimits) -> dict[str, AppLimits]:
    """``{"overrides": {app: {limit: value}}}`` -> each app's limits; ConfigError naming what is wrong."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or not isinstance(doc.get("overrides", {}), Mapping):
        raise ConfigError("the limits file must be a mapping with an 'overrides' mapping of app -> limits",
                          action="see docs: per-tenant limits")
    out: dict[str, AppLimits] = {}
    for app, given in (doc.get("overrides") or {}).items():
        if not isinstance(given, Mapping):
            raise ConfigError(f"overrides.{app} must be a mapping of limit -> value",
                              action="see docs: per-tenant limits")
        values: dict[str, Any] = {}
        for name, value in given.items():
            if name not in LIMIT_NAMES:
                raise ConfigError(f"overrides.{app}.{name} is not a limit; known: {', '.join(LIMIT_NAMES)}",
                                  action="fix the limits file")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"overrides.{app}.{name}={value!r} must be a number >= 0",
                                  action="fix the limits file")
            kind = type(getattr(defaults, name))
            try:
                values[name] = kind(value)
            except (ValueError, OverflowError):  # .inf or .nan for a count
                raise ConfigError(f"overrides.{app}.{name}={value!r} must be a finite number",
                                  action="fix the limits file") from None
        out[str(app)] = replace(defaults, **values)
    return out


class Limits:
    """Looks up an app's limits; reloads the overrides file in the background when it changes."""

    def __init__(self, settings: Settings, *, overrides: Mapping[str, AppLimits] | None = None) -> None:
        self.defaults = AppLimits.defaults(settings)
        self.path = settings.limits_file
        self.reload_s = settings.limits_reload_s
        self._overrides: dict[str, AppLimits] = dict(overrides or {})
        self._mtime_ns: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    def of(self, app: str) -> AppLimits:
        return self._overrides.get(app, self.defaults)

    async def start(self) -> None:
        """Load the file once (a broken file at start is the operator's error: raised), then follow it."""
        if not self.path:
            return
        if not await self.reload():
            raise ConfigError(f"cannot use the limits file {self.path}; see the log",
                              action="fix METRICS_LIMITS_FILE or the file")
        self._task = asyncio.create_task(self._follow(), name="limits-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.reload_s)
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the file if it changed. False (and a log line) when it is unreadable or invalid; the
        overrides in force stay."""
        try:
            got = await asyncio.to_thread(self._read_if_changed)
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            log.error("limits file %s not applied, the previous limits stay in force: %s", self.path, exc)
            return False
        if got is not None:
            self._overrides, self._mtime_ns = got
            self.reloads += 1
            log.info("limits file %s applied: overrides for %d apps", self.path, len(self._overrides))
        return True

    def _read_if_changed(self) -> tuple[dict[str, AppLimits], int] | None:
        mtime_ns = os.stat(self.path).st_mtime_ns
        if mtime_ns == self._mtime_ns:
            return None
        with open(self.path, "rb") as f:
            doc = yaml.safe_load(f)
        return parse_overrides(doc, self.defaults), mtime_ns
