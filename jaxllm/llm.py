"""LLM: the offline API, vLLM's names and semantics: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from jaxllm.config import EngineConfig
from jaxllm.engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | dict | list[int]


class LLM:
    """An engine for offline batched generation. Also a context manager; `close()` frees device memory.

    `llm.model` is the loaded flax.nnx module (models/llama.py), whose params are the very arrays the engine
    steps with. `llm.model(ids)` (ids int32 [B, T]) is a plain causal forward without the KV cache: float32
    logits [B, T, V], differentiable with `jax.grad` / `nnx.grad`. Right-pad a batch of unequal lengths (no mask is
    needed: a position never attends to the padding after it; the padding's own logits are meaningless); left
    padding is not supported. In a quantized model (`quantization=`, or a checkpoint's own) each packed projection
    is a QuantLinear module (models/quant_linear.py) of integer or fp8 weights and float scales: `llm.model(ids)` runs
    it as jnp, differentiable in the scales and zeros (nnx.grad's Params), never in the packed weights.

    To change the model, take its state out and work on a copy: `graphdef, state = nnx.split(llm.model)`, edit
    `state` or the merged module (wrap a layer, a training step), then `nnx.merge(graphdef, state)(ids)`. The
    engine does not see such edits: serving a changed model needs `llm.load_weights` (issue 24), not supported
    yet; assigning to `llm.model`'s params in place changes the module but not what `generate` runs.
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def model(self):
        """The engine's flax.nnx model, its live weights (not a copy); see the class docstring."""
        return self.llm_engine.runner.model

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. Prompts are text, token ids, or
        {"prompt_token_ids": [...]} / {"prompt": "..."} dicts."""
        prompts = _as_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | Sequence | None = None,
             *, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.llm_engine.tokenizer
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template) for c in conversations]
        # The template writes the special tokens itself; outputs carry the rendered text as their prompt (vLLM).
        prompts = [{"prompt": t, "prompt_token_ids": tokenizer.encode(t, add_special_tokens=False)} for t in texts]
        return self._run(prompts, _per_prompt(sampling_params, len(prompts)), use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        params = _final_only(params)
        ids = [str(next(self._ids)) for _ in prompts]
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                engine.add_request(request_id, prompt, p)  # a bad prompt raises before anything runs
                added.append(request_id)
        except Exception:
            engine.abort_request(added)
            raise
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2) as bar:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
        except BaseException:  # a failed step or a KeyboardInterrupt (notebooks) must not leave requests queued
            engine.abort_request([i for i in ids if i not in finished])
            raise
        return [finished[i] for i in ids]

    def close(self) -> None:
        self.llm_engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [{"prompt_token_ids": prompts}]
    return [{"prompt_token_ids": list(p)} if isinstance(p, (list, tuple)) else p for p in prompts]


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"sampling_params has {len(params)} entries for {count} prompts")
    return params


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """As vLLM's LLM: outputs only when a request finishes (RequestOutputKind.FINAL_ONLY), on copies, so the
    caller's SamplingParams are left as they were."""
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if id(p) not in copies:
            copies[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
    return [copies[id(p)] for p in params]
