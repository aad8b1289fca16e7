"""The one place a request is checked against the model and the deployment's limits.

`LLMEngine.process_request` calls `validate_request` for every front end (the server reaches it through
AsyncLLMEngine), so a request is refused with the same message everywhere; the scheduler only asserts what it was
promised. Every failure is a ValueError naming the field and
the limit; `ContextLengthExceededError` is the subclass the server maps to OpenAI's code="context_length_exceeded".
"""

import dataclasses
import numbers
from collections.abc import Callable

from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling.block_manager import max_blocks_needed


class ContextLengthExceededError(ValueError):
    """The prompt, or prompt + max_tokens, does not fit max_model_len."""


class RequestTooLargeError(ValueError):
    """The request could never be scheduled with this configuration (KV pool or max_num_seqs too small)."""


@dataclasses.dataclass(frozen=True)
class ProcessedRequest:
    """A validated request, ready for the scheduler (made on any thread; added on the engine's)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    cache_salt: str | None = None
    grammar: object | None = None  # with structured_outputs: the compiled template matcher


def validate_prompt_token_ids(prompt_token_ids, *, vocab_size: int) -> list[int]:
    """Return the prompt as a list of ints, or raise ValueError for an empty prompt or an id outside the vocab."""
    if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(prompt_token_ids).__name__}.")
    ids = list(prompt_token_ids)
    if not ids:
        raise ValueError("The prompt is empty: prompt_token_ids must contain at least one token.")
    # Plain ints (the usual case) are checked by type alone, not per token (docs/perf-notes.md#host-work-per-request).
    if set(map(type, ids)) != {int}:
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise ValueError(f"prompt_token_ids must contain only integers, got {t!r}.")
        ids = [int(t) for t in ids]
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"prompt_token_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}).")
    return ids


def _check_ids_in_vocab(name: str, ids, vocab_size: int) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"{name} contains token id {t}, outside the vocabulary [0, {vocab_size}).")


def validate_request(prompt_token_ids, params: SamplingParams, *, max_model_len: int, vocab_size: int,
                     max_logprobs: int = 20, max_n: int = 16, max_stop_strings: int = 16,
                     max_stop_string_len: int = 256, max_num_seqs: int | None = None,
                     num_kv_blocks: int | None = None, block_size: int = 16, num_layers: int | None = None,
                     hidden_size: int | None = None) -> tuple[list[int], SamplingParams]:
    """Check one request; return its prompt as a list of plain ints (the one conversion of the ids a request gets)
    and a copy of `params` with max_tokens resolved (None -> max_model_len - prompt). With max_num_seqs and
    num_kv_blocks (the usable device blocks of `block_size` tokens) it must also fit the engine alone
    (RequestTooLargeError otherwise), so the oldest running request can always make progress.

    Raises ValueError (ContextLengthExceededError for length problems). Cheap whatever the request claims: n=10**6
    or a 4 MiB stop list is refused before anything is allocated for it.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}.")
    if params.n > max_n:
        raise ValueError(f"n must be at most {max_n}, got {params.n}.")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > max_logprobs:
            raise ValueError(f"{name} must be at most {max_logprobs}, got {value}.")
    if len(params.stop) > max_stop_strings:
        raise ValueError(f"stop may hold at most {max_stop_strings} strings, got {len(params.stop)}.")
    for s in params.stop:
        if len(s) > max_stop_string_len:
            raise ValueError(f"each stop string must be at most {max_stop_string_len} characters, got {len(s)}.")
    if num_layers is not None:
        _check_research(params, num_layers, hidden_size)
    ids = validate_prompt_token_ids(prompt_token_ids, vocab_size=vocab_size)
    _check_ids_in_vocab("stop_token_ids", params.stop_token_ids, vocab_size)
    if params.logit_bias:
        _check_ids_in_vocab("logit_bias", params.logit_bias, vocab_size)
    if params.allowed_token_ids is not None:
        _check_ids_in_vocab("allowed_token_ids", params.allowed_token_ids, vocab_size)

    num_prompt = len(ids)
    if num_prompt >= max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has {num_prompt} "
            f"tokens, which leaves no room for a completion. Please reduce the length of the prompt.")
    max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len - num_prompt
    if num_prompt + max_tokens > max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the completion "
            f"(max_tokens)). Please reduce the length of the prompt or max_tokens.")
    if params.min_tokens > max_tokens:
        raise ValueError(f"min_tokens must be at most max_tokens ({max_tokens}), got {params.min_tokens}.")
    if max_num_seqs is not None and params.n > max_num_seqs:
        raise RequestTooLargeError(f"n ({params.n}) exceeds max_num_seqs ({max_num_seqs}).")
    need = None if num_kv_blocks is None else max_blocks_needed(num_prompt, max_tokens, params.n, block_size)
    if need is not None and need > num_kv_blocks:
        raise RequestTooLargeError(
            f"The request needs up to {need} KV blocks (prompt {num_prompt} + max_tokens {max_tokens} tokens, "
            f"n={params.n}, block_size {block_size}) but the KV cache has only {num_kv_blocks} blocks. Lower "
            f"max_tokens or n, or give the KV cache more memory (gpu_memory_utilization).")
    params = params.clone() if max_tokens == params.max_tokens else dataclasses.replace(params, max_tokens=max_tokens)
    if params.return_hidden_states is True and num_layers is not None:
        params.return_hidden_states = list(range(num_layers + 1))  # the engine's copy: every layer, HF's order
    return ids, params


def _check_research(params: SamplingParams, num_layers: int, hidden_size: int | None) -> None:
    """Hidden-state layers are 0..L (0: the embeddings, L: after the final norm); steering layers 1..L."""
    if not isinstance(params.return_hidden_states, bool):
        for layer in params.return_hidden_states:
            if not 0 <= layer <= num_layers:
                raise ValueError(f"return_hidden_states layer indices must be in [0, {num_layers}], got {layer}.")
    for layer, vector in (params.steering or {}).items():
        if not 1 <= layer <= num_layers:
            raise ValueError(f"steering layers must be in [1, {num_layers}], got {layer}.")
        if hidden_size is not None and len(vector) != hidden_size:
            raise ValueError(f"steering[{layer}] must have {hidden_size} values (the hidden size), got "
                             f"{len(vector)}.")


def validate_structured_outputs(params: SamplingParams, compile_grammar: Callable | None):
    """The request's compiled grammar (None when unconstrained). `compile_grammar` raises ValueError naming the
    field for an invalid grammar or one over the compile limits; None means the engine has no tokenizer."""
    if params.structured_outputs is None:
        return None
    if compile_grammar is None:
        raise ValueError("structured_outputs needs a tokenizer: the engine was started with skip_tokenizer_init.")
    return compile_grammar(params.structured_outputs)
