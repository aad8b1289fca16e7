"""POST /v1/completions: str / list[str] / token ids / batches of token ids, n, echo, logprobs, streaming."""

import time

from fastapi import Request
from fastapi.responses import Response

from serving.context import ServerContext
from serving.generation import Generation
from serving.logprobs import completion_logprobs
from serving.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo, parse_body
from serving.respond import respond
from serving.streaming import DeltaTracker, sse


async def create_completion(request: Request, ctx: ServerContext) -> Response:
    body = parse_body(await request.body(), request.headers.get("content-type"), CompletionRequest)
    model = ctx.check_model(body.model)
    engine = ctx.host.ready_engine()
    prompts = body.prompts()
    prompt_ids = [p if isinstance(p, list) else await ctx.encode(engine, p, True) for p in prompts]
    overrides = {}
    if body.echo and body.logprobs is not None:
        overrides["prompt_logprobs"] = body.logprobs
    inputs = ctx.engine_inputs(body, prompt_ids, **overrides)
    request_id, gen = ctx.new_generation(engine, "cmpl", inputs)
    view = _CompletionView(body, model, request_id, engine.tokenizer, prompts, prompt_ids)
    return await respond(request, gen, stream=body.stream, request_id=request_id, to_json=view.response,
                         to_chunks=view.chunks)


class _CompletionView:
    """Renders engine outputs as completions responses and stream chunks for one request."""

    def __init__(self, body: CompletionRequest, model: str, request_id: str, tokenizer, prompts, prompt_ids):
        self.body = body
        self.model = model
        self.request_id = request_id
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.created = int(time.time())
        self.prompt_texts = ([p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
                              for p in prompts] if body.echo else None)

    def _logprobs(self, token_ids, positions, text_offset: int = 0):
        if self.body.logprobs is None or positions is None:
            return None
        return completion_logprobs(token_ids, positions, self.body.logprobs, self.tokenizer, text_offset)

    def _prompt_positions(self, prompt_index: int, request_output) -> list:
        return list(request_output.prompt_logprobs or [None] * len(self.prompt_ids[prompt_index]))

    def _echo_logprobs(self, prompt_index: int, request_output):
        return self._logprobs(self.prompt_ids[prompt_index], self._prompt_positions(prompt_index, request_output))

    def _usage(self, finals) -> UsageInfo:
        completion = sum(len(o.token_ids) for out in finals if out is not None for o in out.outputs)
        return UsageInfo.of(sum(len(ids) for ids in self.prompt_ids), completion)

    def response(self, finals: list) -> dict:
        choices = []
        for prompt_index, out in enumerate(finals):
            for o in out.outputs:
                text, logprobs = o.text, self._logprobs(o.token_ids, o.logprobs)
                if self.body.echo:
                    text = self.prompt_texts[prompt_index] + text
                    if logprobs is not None:  # one pass, so text offsets run on through the prompt
                        logprobs = self._logprobs(self.prompt_ids[prompt_index] + list(o.token_ids),
                                                  self._prompt_positions(prompt_index, out) + list(o.logprobs))
                choices.append(CompletionChoice(index=prompt_index * self.body.n + o.index, text=text,
                                                logprobs=logprobs, finish_reason=o.finish_reason,
                                                stop_reason=o.stop_reason))
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=self._usage(finals)).model_dump()

    def _chunk(self, index: int, text: str, logprobs, finish_reason=None, stop_reason=None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                  "stop_reason": stop_reason}
        return sse({"id": self.request_id, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": [choice]})

    async def chunks(self, gen: Generation):
        n = self.body.n
        tracker = DeltaTracker(n)
        last: list = [None] * len(self.prompt_ids)
        echoed: set[int] = set()
        async for prompt_index, out in gen.outputs():
            last[prompt_index] = out
            if self.body.echo and prompt_index not in echoed:
                echoed.add(prompt_index)
                for i in range(n):
                    yield self._chunk(prompt_index * n + i, self.prompt_texts[prompt_index],
                                      self._echo_logprobs(prompt_index, out))
            offset = len(self.prompt_texts[prompt_index]) if self.body.echo else 0
            for d in tracker.deltas(prompt_index, out):
                o = d.output
                logprobs = self._logprobs(o.token_ids[d.token_start:],
                                          o.logprobs[d.token_start:] if o.logprobs is not None else None,
                                          offset + len(o.text) - len(d.text))
                yield self._chunk(d.index, d.text, logprobs, d.finish_reason,
                                  o.stop_reason if d.finish_reason else None)
        if self.body.include_usage:
            yield sse({"id": self.request_id, "object": "text_completion", "created": self.created,
                       "model": self.model, "choices": [], "usage": self._usage(last).model_dump()})
