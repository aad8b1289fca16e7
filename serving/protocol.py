"""OpenAI request bodies (with vLLM's extra sampling fields at top level) and their translation to SamplingParams.

Only the *shape* is checked here (types, required fields, roles); every range (temperature, top_p, n, stop strings,
logprobs, ...) is checked by `jaxllm.SamplingParams`, the one choke point shared with the Python API. Unknown fields
are ignored, as in vLLM.
"""

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from serving.errors import bad_request, pydantic_message


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body[M: BaseModel](raw: bytes, content_type: str | None, model: type[M]) -> M:
    """Strict JSON (no NaN/Infinity) holding an object, validated into `model`; every failure is a 400."""
    if content_type is None or content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise bad_request("Content-Type must be application/json")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise bad_request("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = pydantic_message(exc.errors(include_input=False, include_url=False))
        raise bad_request(message, param) from None


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields common to completions and chat; None means "the SamplingParams default"."""

    model: str | None = None
    n: StrictInt = 1
    best_of: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    min_tokens: StrictInt = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None  # keys are token ids as strings; SamplingParams checks them
    allowed_token_ids: list[StrictInt] | None = None
    prompt_logprobs: StrictInt | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # vLLM's prefix-cache isolation
    # layer -> vector added to the residual stream after that decoder layer; the engine checks range and length.
    steering: dict[str, list[float]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_shape(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def requested_logprobs(self) -> int | None:
        raise NotImplementedError

    def sampling_kwargs(self) -> dict:
        """Keyword arguments for SamplingParams. Omitted max_tokens stays None, which the engine resolves to
        max_model_len - prompt length (vLLM's server default), checking the context length once, in one place."""
        kwargs = dict(n=self.n, best_of=self.best_of, max_tokens=self.requested_max_tokens(),
                      ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, logprobs=self.requested_logprobs(),
                      stop=self.stop, logit_bias=self.logit_bias)
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                        presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                        repetition_penalty=self.repetition_penalty, seed=self.seed, stop_token_ids=self.stop_token_ids,
                        allowed_token_ids=self.allowed_token_ids, prompt_logprobs=self.prompt_logprobs,
                        steering=self.steering)
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: StrictInt | None = None
    echo: bool = False
    logprobs: StrictInt | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of text prompts or token-id prompts; empty prompts are rejected."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise bad_request("prompt must not be empty", "prompt")
        return prompts


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: bool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs is not None and not self.logprobs and self.top_logprobs > 0:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxllm"
    root: str
    max_model_len: int
    # jaxllm's own field (vLLM's card has none): the quantized format the weights were loaded in, null when dense
    quantization: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
