"""The one backoff rule for retriable errors (app/errors.py), shared by the stream jobs and the stores.

Full jitter (AWS, "Exponential Backoff and Jitter": the least contention of the rules measured there), with
the dependency's ``retry_after_s`` as the floor: it can ask for a longer wait, jitter never undercuts it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from app.errors import RetriableError

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
OnRetry = Callable[[RetriableError, int, float], None]
"""Told ``(error, retry, delay_s)`` before each wait: where callers count and log."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long to wait before each retry, and how many tries in all (``attempts``; None: until it
    succeeds, which is the stream jobs' backpressure). ``jitter`` returns a float in [0, 1), injected so
    tests pin the delays."""

    base_s: float
    max_s: float
    attempts: int | None = None
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.base_s <= self.max_s or (self.attempts is not None and self.attempts < 1):
            raise ValueError(f"need 0 <= base_s <= max_s and attempts >= 1, got {self}")

    @classmethod
    def from_ms(cls, base_ms: int, max_ms: int, *, attempts: int | None = None,
                jitter: Callable[[], float] = random.random) -> RetryPolicy:
        """From the millisecond settings (``backoff_base_ms``, ``backoff_max_ms``)."""
        return cls(base_s=base_ms / 1000, max_s=max_ms / 1000, attempts=attempts, jitter=jitter)

    def delay_s(self, retry: int, retry_after_s: float = 0.0) -> float:
        """The wait before retry ``retry`` (1, 2, ...): uniform in [0, min(max_s, base_s * 2**(retry-1))],
        raised to ``retry_after_s``, never above ``max_s`` (the operator's bound wins)."""
        ceiling_s = min(self.max_s, self.base_s * 2.0 ** min(retry - 1, 60))
        return min(self.max_s, max(retry_after_s, self.jitter() * ceiling_s))


async def retry_retriable(op: Callable[[], Awaitable[T]], *, policy: RetryPolicy, sleep: Sleep = asyncio.sleep,
                          on_retry: OnRetry | None = None) -> T:
    """``await op()`` until it returns, waiting ``policy.delay_s`` after each RetriableError. Any other
    error propagates at once, and so does cancellation during a wait (shutdown); after ``policy.attempts``
    tries the last RetriableError is raised as it is, so callers still decide from its class."""
    retry = 0
    while True:
        try:
            return await op()
        except RetriableError as exc:
            retry += 1
            if policy.attempts is not None and retry >= policy.attempts:
                raise
            delay_s = policy.delay_s(retry, exc.retry_after_s)
            if on_retry is not None:
                on_retry(exc, retry, delay_s)
            await sleep(delay_s)
