"""Classified errors: every error says whether retrying can help and what the operator should do.

Callers decide from ``retriable`` (as aiokafka does), never from the message text.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class. ``retriable`` tells callers whether the same call may succeed later."""

    retriable: bool = False

    def __init__(self, message: str, *, action: str = "") -> None:
        self.action = action
        super().__init__(f"{message} -- {action}" if action else message)


class RetriableError(PipelineError):
    """A dependency is unavailable or throttling; retry with backoff."""

    retriable = True

    def __init__(self, message: str, *, action: str = "", retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, action=action)


def retry_delay_s(exc: RetriableError, attempt: int, *, base_ms: int, max_ms: int, jitter: float) -> float:
    """Backoff before retry ``attempt`` (1, 2, ...): exponential from ``base_ms``, at least what the
    dependency asked for, capped at ``max_ms``, then jittered into [50 %, 100 %] (``jitter`` in [0, 1))."""
    delay_s = min(max_ms / 1000, max(exc.retry_after_s, base_ms / 1000 * (1 << min(attempt, 30))))
    return delay_s * (0.5 + jitter / 2)


class ConfigError(PipelineError):
    """A setting is missing or invalid; the process cannot start until it is fixed."""


class StoreError(PipelineError):
    """DynamoDB rejected a request in a way retrying will not fix (schema, permissions, size)."""


class StoreUnavailable(RetriableError):
    """DynamoDB is throttling or unreachable."""
