"""Server-sent events: turning cumulative RequestOutputs into per-choice deltas, and the response that streams them.

The engine yields cumulative outputs (the whole text so far); `DeltaTracker` remembers what each choice has been
sent and hands out only the new text, new token positions and, exactly once, the finish reason. `SSEResponse`
closes the Generation however the stream ends (finished, client gone, server error), which aborts what is left.
"""

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.responses import StreamingResponse

from serving.errors import APIError
from serving.generation import engine_failure

logger = logging.getLogger("jaxllm.serving")

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ChoiceDelta:
    index: int  # the choice's index in the response: prompt_index * n + output.index
    output: object  # the cumulative CompletionOutput
    text: str  # text not yet sent
    token_start: int  # first token position not yet sent
    finish_reason: str | None  # set on the one delta that finishes this choice


class DeltaTracker:
    def __init__(self, n: int):
        self._n = n
        self._sent_chars: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
        self._finished: set[int] = set()

    def deltas(self, prompt_index: int, request_output) -> list[ChoiceDelta]:
        result = []
        for output in request_output.outputs:
            index = prompt_index * self._n + output.index
            if index in self._finished:
                continue
            sent_chars = self._sent_chars.get(index, 0)
            token_start = self._sent_tokens.get(index, 0)
            text = output.text[sent_chars:]
            finish_reason = output.finish_reason
            if not text and len(output.token_ids) == token_start and finish_reason is None:
                continue
            self._sent_chars[index] = len(output.text)
            self._sent_tokens[index] = len(output.token_ids)
            if finish_reason is not None:
                self._finished.add(index)
            result.append(ChoiceDelta(index, output, text, token_start, finish_reason))
        return result


async def with_error_event(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends every stream with `[DONE]`; a failure after the first byte becomes an error event before it."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the status line is gone; the error must travel in the stream
        err = exc if isinstance(exc, APIError) else engine_failure(exc)
        yield sse(err.body())
    yield DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always runs `on_close` once the connection is done with it."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None):
        super().__init__(with_error_event(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
