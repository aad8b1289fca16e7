"""tests/waiting.py: the first truthy value comes back, a condition that never holds fails after its deadline with
the message, and the async twin awaits predicates that return awaitables."""

import asyncio
import time

import pytest

from waiting import async_wait_until, wait_until


def test_returns_the_first_truthy_value():
    calls = iter([0, None, "", "ready"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0) == "ready"


def test_fails_after_the_deadline_with_the_message():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"never true \(waited 0.05 s\)"):
        wait_until(lambda: False, timeout=0.05, message=lambda: "never true")
    assert 0.05 <= time.monotonic() - started < 2


def test_async_twin_awaits_the_predicate():
    seen = []

    async def ready() -> bool:
        seen.append(1)
        return len(seen) >= 3

    assert asyncio.run(async_wait_until(ready, timeout=5, interval=0)) is True
    assert len(seen) == 3
    with pytest.raises(TimeoutError, match="still waiting"):
        asyncio.run(async_wait_until(lambda: 0, timeout=0.05, message="still waiting"))
