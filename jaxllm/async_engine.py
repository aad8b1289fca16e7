"""AsyncLLMEngine: the engine loop on a background thread, one async output stream per request.

The asyncio side never blocks on the device: requests and aborts go to the engine thread through a queue, and
outputs come back through `loop.call_soon_threadsafe`. A failing step fails every in-flight request with
EngineStepError and leaves the engine dead (reported by `is_healthy`), never hung.
"""

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine, ProgressFn
from jaxllm.engine_stats import EngineStats
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine failed while running a step; every request in flight then fails with this."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (after a failed step or shutdown) and takes no new requests."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, *, progress: ProgressFn | None = None):
        self.engine = LLMEngine(config, progress=progress)
        self.errored: BaseException | None = None
        self.last_step_time = time.monotonic()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def quantization(self) -> str | None:
        """The quantized format loaded ("awq", "gguf", ...); None for a dense model."""
        return self.engine.quantization

    @property
    def served_model_name(self) -> str:
        return self.engine.model_name

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def is_healthy(self, stall_timeout: float = 60.0) -> bool:
        """False once the loop died, or while a step has been running for longer than `stall_timeout`."""
        if self.errored is not None or not self._thread.is_alive():
            return False
        busy = self.engine.has_unfinished_requests()
        return not busy or time.monotonic() - self.last_step_time < stall_timeout

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str, *,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream cumulative RequestOutputs for one request. Bad input raises ValueError before anything is
        queued; leaving the iteration early (break, cancellation, client disconnect) aborts the request.
        Requests with different cache salts never share prefix-cache blocks."""
        if self.errored is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if sampling_params.structured_outputs is None:
            request = self.engine.process_request(request_id, prompt, sampling_params, cache_salt=cache_salt)
        else:  # its grammar compiles for up to the compiler's time limit: off the event loop
            request = await asyncio.to_thread(self.engine.process_request, request_id, prompt, sampling_params,
                                              cache_salt=cache_salt)
            if request_id in self._streams:  # taken while this one compiled
                raise ValueError(f"request_id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        if self.errored is not None:  # the loop died after the check above and may have missed this stream
            self._streams.pop(request_id, None)
            raise EngineDeadError("the engine is not running")
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream, if still being read, ends with a finished output (finish_reason "abort")."""
        self._send(("abort", request_id))

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self.engine.close()

    def _send(self, message) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if payload.request_id in self._streams:  # not abandoned before it reached the loop
                    self.engine.add_processed_request(payload)
            else:
                for output in self.engine.abort_request(payload):
                    stream = self._streams.get(output.request_id)
                    if stream is not None:  # aborted through abort() while its stream is still read: end it
                        stream.put(output)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                self.last_step_time = time.monotonic()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - any step failure must reach every waiting client
                logger.exception("engine step failed; failing all in-flight requests")
                self._fail_all(error)
                return
            self.last_step_time = time.monotonic()
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.put(output)
        self._fail_all(None)

    def _fail_all(self, error: BaseException | None) -> None:
        self.errored = error or EngineDeadError("the engine was shut down")
        failure = EngineStepError(f"engine step failed: {type(error).__name__}") if error else self.errored
        try:  # before the streams hear of it, so a client that sees the error sees the blocks freed
            self.engine.abort_all()
        except Exception:  # noqa: BLE001 - the streams must be failed whatever state the engine is in
            logger.exception("aborting the requests of a failed engine failed")
        for stream in list(self._streams.values()):
            stream.put(failure)
