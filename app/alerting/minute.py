"""The input of monitors and policies: one closed minute of one (app, process type)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tables.aggregate import Aggregate

WINDOW_MS = 60_000


@dataclass(frozen=True, slots=True)
class Minute:
    """What monitors and policies need from one closed minute of one (app, process type)."""

    app: str
    process_type: str
    start_ms: int
    requests: int
    failed: int
    p95_ms: float | None

    @classmethod
    def from_aggregate(cls, agg: Aggregate) -> Minute:
        n = agg.requests
        p95 = agg.response.digest.quantile(0.95) if agg.response.n else None  # .n flushes buffered values
        return cls(agg.key.app, agg.key.process_type, agg.key.start_ms, n, agg.failed if n else 0,
                   None if p95 is None else float(p95))

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Minute:
        """From a ``metrics-1m`` record (Aggregate.to_record()); ValueError when it is not one."""
        try:
            return cls.from_aggregate(Aggregate.from_record(dict(rec)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a metrics-1m record: {exc!r}") from None

    @property
    def error_rate(self) -> float | None:
        return self.failed / self.requests if self.requests else None
