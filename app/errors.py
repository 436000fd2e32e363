"""Classified errors: every error says whether retrying can help and what the operator should do.

Callers decide from ``retriable`` (as aiokafka does), never from the message text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PipelineError(Exception):
    """Base class. ``retriable`` tells callers whether the same call may succeed later."""

    retriable: bool = False

    def __init__(self, message: str, *, action: str = "") -> None:
        self.action = action
        super().__init__(f"{message} -- {action}" if action else message)


class RetriableError(PipelineError):
    """A dependency is unavailable or throttling; retry with backoff (app/retry.py), waiting at least
    ``retry_after_s``."""

    retriable = True

    def __init__(self, message: str, *, action: str = "", retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, action=action)


class ConfigError(PipelineError):
    """A setting is missing or invalid; the process cannot start until it is fixed."""


class StoreError(PipelineError):
    """The store refused an item (or request) in a way retrying will not fix: too large, a name it cannot
    key. The rest of a batch may still be stored; the refused item is dead-lettered."""


class StoreFatal(StoreError):
    """The store refuses every request until an operator acts: credentials, permissions, a missing table or
    keyspace, or a failure nobody classified. Not retriable by backoff and no item's fault, so nothing is
    dead-lettered: writers stop consuming, turn not-ready and retry slowly until the cause is fixed. A
    subclass of StoreError, so callers that only tell "retry" from "do not" keep working."""


class ItemsRefused(StoreError):
    """``put_many`` stored every item but ``refused`` (each MetricItem with its reason; typed Any because
    this layer is below the storage protocol); raised after the others were written, so a caller
    dead-letters exactly those."""

    def __init__(self, message: str, *, refused: Sequence[tuple[Any, StoreError]], action: str = "") -> None:
        self.refused = list(refused)
        super().__init__(message, action=action)


class StoreUnavailable(RetriableError):
    """The store (any backend) is throttling or unreachable."""
