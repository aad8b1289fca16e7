"""ServerContext: what every route needs (engine host, metrics, served names, server limits) and the steps all
generation routes share: model check, tokenization, SamplingParams, admission."""

import asyncio
import logging
import uuid
from dataclasses import dataclass

from serving.engine_host import EngineHost
from serving.errors import APIError, bad_request, from_engine_value_error
from serving.generation import EngineInput, Generation
from serving.metrics import ServerMetrics

logger = logging.getLogger("jaxllm.serving")

# Tokenizing this much text inline would hold up the event loop (health probes, other streams) noticeably.
_INLINE_TOKENIZE_CHARS = 8192


@dataclass
class ServerContext:
    host: EngineHost
    metrics: ServerMetrics
    served_model_names: list[str]
    chat_template: str | None = None
    log_requests: bool = False
    max_log_len: int | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, requested: str | None) -> str:
        """The served name to answer with; a name we do not serve is a 404 (it is matched, never used as a path)."""
        if requested is None or requested in self.served_model_names:
            return self.model_name
        raise APIError(404, f"The model `{requested[:256]}` does not exist.", param="model", code="model_not_found")

    async def encode(self, engine, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return list(await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens=add_special_tokens))

    async def chat_prompt_ids(self, engine, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """Renders the chat template and tokenizes it; the template already holds BOS, so none is added again."""
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                        chat_template=self.chat_template)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation is the client's error
            raise bad_request(_template_error(exc), "messages") from None
        return await self.encode(engine, text, add_special_tokens=False)

    def engine_inputs(self, body, prompts_ids: list[list[int]], **overrides) -> list[EngineInput]:
        """One EngineInput per prompt; SamplingParams is the validation choke point (ValueError -> 400)."""
        from jaxllm import SamplingParams

        try:
            params = SamplingParams(**(body.sampling_kwargs() | overrides))
        except ValueError as exc:
            raise from_engine_value_error(exc) from None
        return [EngineInput(ids, params, body.cache_salt) for ids in prompts_ids]

    def new_generation(self, engine, prefix: str, inputs: list[EngineInput]) -> tuple[str, Generation]:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        lease = self.host.admit([f"{request_id}-{i}" for i in range(len(inputs))])
        if self.log_requests:
            for i, inp in enumerate(inputs):
                ids = inp.prompt_token_ids[: self.max_log_len] if self.max_log_len is not None else inp.prompt_token_ids
                logger.info("request %s-%d: prompt_token_ids=%s params=%s", request_id, i, ids, inp.params)
        return request_id, Generation(engine, lease, inputs, on_finished=self.metrics.observe_finished)


def _template_error(exc: Exception) -> str:
    # The tokenizer reports a rejected conversation as ValueError (e.g. the template's own raise_exception);
    # other exception texts might name files, so only their type is shown.
    if isinstance(exc, ValueError):
        return str(exc)[:500]
    return f"the chat template failed on these messages ({type(exc).__name__})"
