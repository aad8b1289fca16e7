"""EngineHost: the server's one engine, from loading through serving to draining.

It answers three questions for the routes: is there an engine that may take work now (else 503 with a reason), is
the server healthy (/health), and which engine requests are in flight (admission against the queue limit, and the
set to abort when a drain times out). The engine is built in a daemon thread so /health can answer 503 while the
model loads and compiles.
"""

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from serving.errors import APIError, unavailable

logger = logging.getLogger("jaxllm.serving")


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str


class Lease:
    """Engine requests admitted together (one per prompt of an HTTP request); release exactly once."""

    def __init__(self, host: "EngineHost", request_ids: list[str]):
        self.host = host
        self.request_ids = request_ids
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.host._release(self.request_ids)


class EngineHost:
    def __init__(self, engine_factory: Callable[[], object], *, max_in_flight: int | None = None,
                 stall_timeout_s: float = 60.0):
        self._engine_factory = engine_factory
        self.engine = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.max_in_flight = max_in_flight
        self.stall_timeout_s = stall_timeout_s
        self.active: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def load(self) -> None:
        """Builds the engine off the event loop; on failure keeps the error and re-raises it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def build():
            try:
                engine, error = self._engine_factory(), None
            except BaseException as exc:  # noqa: BLE001 - reported to the loop, which decides what to do
                engine, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, done, engine, error)
            except RuntimeError:  # the loop is closed: the server stopped while this loaded; nobody waits for it
                pass

        # A daemon thread, not to_thread: a SIGTERM during a long compile must not wait for it to finish.
        threading.Thread(target=build, name="jaxllm-engine-load", daemon=True).start()
        try:
            self.engine = await done
        except BaseException as exc:
            self.load_error = exc
            raise

    def health(self) -> Health:
        if self.draining:
            return Health(False, "shutting down")
        if self.engine is None:
            return Health(False, "engine failed to load" if self.load_error else "starting")
        if self.engine.errored is not None:
            return Health(False, "engine is dead")
        # The engine's watchdog: unhealthy while one step has been running longer than the stall timeout.
        if not self.engine.is_healthy(stall_timeout=self.stall_timeout_s):
            return Health(False, "engine stalled or stopped")
        return Health(True, "ok")

    def ready_engine(self):
        """The engine if it may take new work, else the 503 to send."""
        if self.draining:
            raise unavailable("the server is shutting down", "server_shutting_down", retry_after=5)
        if self.engine is None:
            raise unavailable("the model is still loading", "server_starting", retry_after=5)
        if self.engine.errored is not None:
            raise APIError(503, "the engine has stopped after an internal error", code="engine_dead")
        return self.engine

    def admit(self, request_ids: list[str]) -> Lease:
        """Admits engine requests or raises 503 + Retry-After when the server's queue is full."""
        self.ready_engine()
        if self.max_in_flight is not None and len(self.active) + len(request_ids) > self.max_in_flight:
            raise unavailable("the server is at capacity, retry later", "server_overloaded")
        self.active.update(request_ids)
        self._idle.clear()
        return Lease(self, request_ids)

    def _release(self, request_ids: list[str]) -> None:
        self.active.difference_update(request_ids)
        if not self.active:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new work, waits up to timeout_s for in-flight requests, aborts the rest; True if all finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout_s, 0))
            return True
        except TimeoutError:
            await self.abort_all()
            return False

    async def abort_all(self) -> None:
        if self.engine is None:
            return
        for request_id in list(self.active):
            try:
                await self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - best effort while shutting down
                logger.exception("abort of %s failed", request_id)

    async def shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
