"""POST /v1/chat/completions: the tokenizer's chat template (or --chat-template), n, logprobs, streaming."""

import time

from fastapi import Request
from fastapi.responses import Response

from serving.context import ServerContext
from serving.generation import Generation
from serving.logprobs import chat_logprobs
from serving.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    UsageInfo,
    parse_body,
)
from serving.respond import respond
from serving.streaming import DeltaTracker, sse


async def create_chat_completion(request: Request, ctx: ServerContext) -> Response:
    body = parse_body(await request.body(), request.headers.get("content-type"), ChatCompletionRequest)
    model = ctx.check_model(body.model)
    engine = ctx.host.ready_engine()
    prompt_ids = await ctx.chat_prompt_ids(engine, body.template_messages(), body.add_generation_prompt)
    inputs = ctx.engine_inputs(body, [prompt_ids])
    request_id, gen = ctx.new_generation(engine, "chatcmpl", inputs)
    view = _ChatView(body, model, request_id, engine.tokenizer, len(prompt_ids))
    return await respond(request, gen, stream=body.stream, request_id=request_id, to_json=view.response,
                         to_chunks=view.chunks)


class _ChatView:
    """Renders engine outputs as chat responses and stream chunks for one request."""

    def __init__(self, body: ChatCompletionRequest, model: str, request_id: str, tokenizer, prompt_tokens: int):
        self.body = body
        self.model = model
        self.request_id = request_id
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())

    def _logprobs(self, token_ids, positions):
        if not self.body.logprobs or positions is None:
            return None
        return chat_logprobs(token_ids, positions, self.body.top_logprobs or 0, self.tokenizer)

    def _usage(self, final) -> UsageInfo:
        completion = sum(len(o.token_ids) for o in final.outputs) if final is not None else 0
        return UsageInfo.of(self.prompt_tokens, completion)

    def response(self, finals: list) -> dict:
        (final,) = finals
        choices = [ChatChoice(index=o.index, message=ChatMessageOut(content=o.text),
                              logprobs=self._logprobs(o.token_ids, o.logprobs), finish_reason=o.finish_reason,
                              stop_reason=o.stop_reason)
                   for o in final.outputs]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                      usage=self._usage(final)).model_dump()

    def _chunk(self, choices: list[dict], **extra) -> str:
        return sse({"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": choices, **extra})

    async def chunks(self, gen: Generation):
        tracker = DeltaTracker(self.body.n)
        for index in range(self.body.n):
            yield self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
        final = None
        async for _, out in gen.outputs():
            final = out
            for d in tracker.deltas(0, out):
                o = d.output
                logprobs = self._logprobs(o.token_ids[d.token_start:],
                                          o.logprobs[d.token_start:] if o.logprobs is not None else None)
                choice = {"index": d.index, "delta": {"content": d.text} if d.text else {}, "logprobs": logprobs,
                          "finish_reason": d.finish_reason}
                if d.finish_reason is not None:
                    choice["stop_reason"] = o.stop_reason
                yield self._chunk([choice])
        if self.body.include_usage:
            yield self._chunk([], usage=self._usage(final).model_dump())
