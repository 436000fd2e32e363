"""The retry policy (app/retry.py) with a recording sleep and pinned jitter: the delays themselves."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import RetriableError, StoreError, StoreFatal, StoreUnavailable
from app.retry import RetryPolicy, retry_retriable


class Sleeps:
    """Records requested waits instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class Flaky:
    """Raises ``errors`` one per call, then returns the number of calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.calls


def policy(jitter: float = 1.0, *, attempts: int | None = None) -> RetryPolicy:
    return RetryPolicy(base_s=0.1, max_s=1.0, attempts=attempts, jitter=lambda: jitter)


def throttled(n: int, retry_after_s: float = 0.0) -> list[Exception]:
    return [StoreUnavailable("throttled", retry_after_s=retry_after_s) for _ in range(n)]


async def test_retries_until_success_with_exponential_delays_capped_at_max() -> None:
    sleeps, op = Sleeps(), Flaky(*throttled(6))
    assert await retry_retriable(op, policy=policy(), sleep=sleeps) == 7
    assert sleeps.calls == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])  # jitter pinned at the ceiling


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.999])
async def test_full_jitter_is_uniform_below_the_ceiling(jitter: float) -> None:
    p = policy(jitter)
    for retry, ceiling_s in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (200, 1.0)]:
        assert p.delay_s(retry) == pytest.approx(jitter * ceiling_s)
        assert 0 <= p.delay_s(retry) <= ceiling_s


async def test_retry_after_s_is_a_floor_that_jitter_never_undercuts() -> None:
    sleeps = Sleeps()
    await retry_retriable(Flaky(*throttled(3, retry_after_s=0.3)), policy=policy(0.0), sleep=sleeps)
    assert sleeps.calls == [0.3, 0.3, 0.3]
    assert policy(1.0).delay_s(4, retry_after_s=0.3) == pytest.approx(0.8)  # longer backoff still wins


async def test_max_s_bounds_even_a_longer_retry_after_s() -> None:
    assert policy(0.0).delay_s(1, retry_after_s=10.0) == 1.0


async def test_attempts_caps_the_tries_and_raises_the_last_error_as_it_is() -> None:
    sleeps, errors = Sleeps(), throttled(5)
    op = Flaky(*errors)
    with pytest.raises(StoreUnavailable) as err:
        await retry_retriable(op, policy=policy(attempts=3), sleep=sleeps)
    assert op.calls == 3 and len(sleeps.calls) == 2 and err.value is errors[2]
    assert await retry_retriable(Flaky(), policy=policy(attempts=1), sleep=sleeps) == 1


@pytest.mark.parametrize("error", [StoreError("too large"), StoreFatal("AccessDenied"), ValueError("bug")])
async def test_non_retriable_errors_propagate_at_once(error: Exception) -> None:
    sleeps, told = Sleeps(), []
    op = Flaky(*throttled(1), error)
    with pytest.raises(type(error)):
        await retry_retriable(op, policy=policy(), sleep=sleeps, on_retry=lambda *a: told.append(a))
    assert op.calls == 2 and sleeps.calls == [0.1] and len(told) == 1


async def test_on_retry_is_told_the_error_the_retry_and_the_delay_before_the_wait() -> None:
    told: list[tuple[RetriableError, int, float]] = []
    sleeps = Sleeps()
    errors = throttled(2, retry_after_s=0.15)

    def on_retry(exc: RetriableError, retry: int, delay_s: float) -> None:
        assert len(sleeps.calls) == retry - 1  # called before the sleep
        told.append((exc, retry, delay_s))

    await retry_retriable(Flaky(*errors), policy=policy(0.5), sleep=sleeps, on_retry=on_retry)
    assert told == [(errors[0], 1, 0.15), (errors[1], 2, 0.15)] and sleeps.calls == [0.15, 0.15]


async def test_cancellation_during_the_wait_propagates() -> None:
    waiting = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(retry_retriable(Flaky(*throttled(1)), policy=policy(), sleep=sleep))
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_from_ms_and_bad_bounds() -> None:
    p = RetryPolicy.from_ms(50, 5000, attempts=4)
    assert (p.base_s, p.max_s, p.attempts) == (0.05, 5.0, 4)
    for base_s, max_s, attempts in [(2.0, 1.0, None), (-1.0, 1.0, None), (0.1, 1.0, 0)]:
        with pytest.raises(ValueError):
            RetryPolicy(base_s=base_s, max_s=max_s, attempts=attempts)
