"""Generation: the engine streams behind one HTTP request (one per prompt), started, consumed and closed together.

`start()` waits for every stream's first output, so the engine's validation (ValueError, context length) surfaces
before a status line is sent. `aclose()` is the single exit: it cancels what still runs, aborts unfinished engine
requests (freeing their KV blocks at once) and releases the admission lease; every route calls it in a `finally`.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serving.engine_host import Lease
from serving.errors import APIError, from_engine_value_error

logger = logging.getLogger("jaxllm.serving")

_END = object()


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


@dataclass(frozen=True)
class EngineInput:
    prompt_token_ids: list[int]
    params: object  # jaxllm.SamplingParams
    cache_salt: str | None = None  # requests with different salts never share prefix-cache blocks


def engine_failure(exc: BaseException) -> APIError:
    """What to tell the client when the engine fails a request: 400 for its validation, 500 otherwise."""
    from jaxllm import EngineDeadError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine has stopped", code="engine_dead")
    if isinstance(exc, ValueError):
        return from_engine_value_error(exc)
    logger.error("request failed in the engine: %s: %s", type(exc).__name__, exc)
    return APIError(500, "the engine failed while running this request", code="engine_error")


class Generation:
    def __init__(self, engine, lease: Lease, inputs: list[EngineInput],
                 on_finished: Callable[[object], None] = lambda output: None):
        assert len(lease.request_ids) == len(inputs)
        self._engine = engine
        self._lease = lease
        self.inputs = inputs
        self._on_finished = on_finished
        self._streams = []
        self._pumps: list[asyncio.Task] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._finished: set[int] = set()
        self._closed = False

    @property
    def request_ids(self) -> list[str]:
        return self._lease.request_ids

    async def start(self) -> None:
        """Submits every prompt; raises the engine's error (e.g. ValueError -> 400) if any prompt is refused."""
        for rid, inp in zip(self.request_ids, self.inputs):
            stream = self._engine.generate({"prompt_token_ids": inp.prompt_token_ids}, inp.params, rid,
                                           cache_salt=inp.cache_salt)
            self._streams.append(stream)
        firsts = await asyncio.gather(*(anext(s) for s in self._streams), return_exceptions=True)
        for result in firsts:
            if isinstance(result, BaseException):
                raise result
        for index, (stream, first) in enumerate(zip(self._streams, firsts)):
            self._queue.put_nowait((index, first))
            self._pumps.append(asyncio.create_task(self._pump(index, stream)))

    async def _pump(self, index: int, stream) -> None:
        try:
            async for output in stream:
                self._queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which reports it
            self._queue.put_nowait((index, exc))
            return
        self._queue.put_nowait((index, _END))

    async def outputs(self) -> AsyncIterator[tuple[int, object]]:
        """Yields (prompt index, cumulative RequestOutput) as they arrive until every prompt has finished."""
        ended: set[int] = set()
        while len(ended) < len(self.inputs):
            index, item = await self._queue.get()
            if item is _END:
                ended.add(index)
                continue
            if isinstance(item, BaseException):
                raise item
            if item.finished and index not in self._finished:
                self._finished.add(index)
                self._on_finished(item)
            yield index, item

    async def final_outputs(self) -> list[object]:
        """The last RequestOutput of every prompt, in prompt order."""
        last: list[object] = [None] * len(self.inputs)
        async for index, output in self.outputs():
            last[index] = output
        return last

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for pump in self._pumps:
                pump.cancel()
            for stream in self._streams:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except Exception:  # noqa: BLE001 - closing is best effort; abort below is what counts
                        pass
            for index, rid in enumerate(self.request_ids):
                if index not in self._finished:
                    await self._engine.abort(rid)
        finally:
            self._lease.release()


async def run_until_disconnected(request, work) -> object:
    """Awaits `work`, cancelling it and raising ClientDisconnected if the client closes the connection first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nobody to tell
        pass
    raise ClientDisconnected()


async def _wait_for_disconnect(request) -> None:
    # After the body is read, uvicorn's receive() blocks until the client disconnects (or the response is sent).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
