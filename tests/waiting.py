"""Waiting for a condition with a deadline, instead of sleeping a fixed time and hoping it happened.

`wait_until(predicate)` polls `predicate()` every `interval` seconds and returns its first truthy value; after
`timeout` seconds it raises TimeoutError with `message` (a string, or a callable evaluated then, for a log tail).
`async_wait_until` is the same inside an event loop; its predicate may also return an awaitable.
"""

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def _timeout_error(message: str | Callable[[], str], timeout: float) -> TimeoutError:
    text = message() if callable(message) else message
    return TimeoutError(f"{text} (waited {timeout} s)")


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.01,
               message: str | Callable[[], str] = "condition never held") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timeout_error(message, timeout)
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.01,
                           message: str | Callable[[], str] = "condition never held") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise _timeout_error(message, timeout)
        await asyncio.sleep(interval)
