"""SamplingParams defaults, normalization and validation, and the shared request validation choke point."""

import math

import numpy as np
import pytest

from jaxllm.sampling_params import SamplingParams, SamplingType
from jaxllm.validation import (
    ContextLengthExceededError,
    RequestTooLargeError,
    validate_prompt_token_ids,
    validate_request,
)

VOCAB, MAX_LEN = 100, 64


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.temperature, p.top_p, p.top_k,
            p.min_p, p.seed, p.stop, p.stop_token_ids, p.include_stop_str_in_output, p.ignore_eos, p.max_tokens,
            p.min_tokens, p.logprobs, p.prompt_logprobs, p.skip_special_tokens, p.spaces_between_special_tokens,
            p.logit_bias, p.allowed_token_ids, p.best_of) == (
        1, 0.0, 0.0, 1.0, 1.0, 1.0, 0, 0.0, None, [], [], False, False, 16, 0, None, None, True, True, None, None,
        None)
    assert p.sampling_type is SamplingType.RANDOM and not p.is_greedy


def test_normalization():
    p = SamplingParams(stop="###", stop_token_ids=(5, 6), seed=-1, top_k=-1, logprobs=True,
                       logit_bias={"12": 1, 3: -100.0}, allowed_token_ids=(1, 2))
    assert p.stop == ["###"] and p.stop_token_ids == [5, 6] and p.seed is None and p.top_k == 0
    assert p.logprobs == 1 and p.logit_bias == {12: 1.0, 3: -100.0} and p.allowed_token_ids == [1, 2]
    assert p.output_text_buffer_length == 2
    assert SamplingParams(stop=["ab", "abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams(seed=7).sampling_type is SamplingType.RANDOM_SEED


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_tiny_temperature_is_greedy_and_drops_truncation(temperature):
    p = SamplingParams(temperature=temperature, top_p=0.5, top_k=5, min_p=0.2)
    assert p.is_greedy and p.sampling_type is SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)


def test_small_positive_temperature_is_raised_like_vllm():
    assert SamplingParams(temperature=1e-3).temperature == 1e-2


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(2)


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 0}, "n"), ({"n": 1.5}, "n"), ({"n": True}, "n"),
    ({"best_of": 3, "n": 2}, "best_of"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.5}, "min_p"),
    ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 3.0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"prompt_logprobs": -2}, "prompt_logprobs"), ({"logprobs": 1.5}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"stop": ["ok", 3]}, "stop"), ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"), ({"logit_bias": {-3: 1.0}}, "logit_bias"),
    ({"logit_bias": {3: math.nan}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-4]}, "allowed_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_validate_request_resolves_max_tokens_and_copies():
    params = SamplingParams(max_tokens=None)
    ids, resolved = validate_request([1, 2, 3], params, max_model_len=MAX_LEN, vocab_size=VOCAB)
    assert ids == [1, 2, 3] and resolved.max_tokens == MAX_LEN - 3 and params.max_tokens is None
    _, same = validate_request([1], SamplingParams(max_tokens=5), max_model_len=MAX_LEN, vocab_size=VOCAB)
    assert same.max_tokens == 5


@pytest.mark.parametrize("prompt,kwargs,field", [
    ([], {}, "empty"), ([1, VOCAB], {}, "prompt_token_ids"), ([-1, 2], {}, "prompt_token_ids"),
    ([1, True], {}, "prompt_token_ids"), ("text", {}, "prompt_token_ids"), ([1.0], {}, "prompt_token_ids"),
    ([1], {"n": 17}, "n"), ([1], {"n": 10**6}, "n"),
    ([1], {"logprobs": 21}, "logprobs"), ([1], {"prompt_logprobs": 21}, "prompt_logprobs"),
    ([1], {"stop": ["x"] * 17}, "stop"), ([1], {"stop": ["x" * 257]}, "stop"),
    ([1], {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ([1], {"logit_bias": {VOCAB: 1.0}}, "logit_bias"),
    ([1], {"allowed_token_ids": [1, VOCAB + 5]}, "allowed_token_ids"),
    ([1] * 60, {"max_tokens": 10, "min_tokens": 0}, "maximum context length"),
    ([1] * 10, {"max_tokens": None, "min_tokens": 60}, "min_tokens"),
])
def test_validate_request_refusals(prompt, kwargs, field):
    with pytest.raises(ValueError, match=field):
        validate_request(prompt, SamplingParams(**kwargs), max_model_len=MAX_LEN, vocab_size=VOCAB)


@pytest.mark.parametrize("prompt_len,max_tokens", [(64, 1), (65, None), (64, None), (60, 5)])
def test_context_length_errors_have_their_own_class(prompt_len, max_tokens):
    with pytest.raises(ContextLengthExceededError, match=str(MAX_LEN)):
        validate_request([1] * prompt_len, SamplingParams(max_tokens=max_tokens), max_model_len=MAX_LEN,
                         vocab_size=VOCAB)


def test_a_request_that_can_never_fit_the_engine_is_refused_up_front():
    engine = dict(max_model_len=100, vocab_size=VOCAB, num_kv_blocks=4, block_size=4, max_num_seqs=8)  # 16 tokens
    with pytest.raises(RequestTooLargeError, match="KV blocks"):
        validate_request([1] * 10, SamplingParams(max_tokens=8), **engine)
    validate_request([1] * 10, SamplingParams(max_tokens=7), **engine)  # 16 tokens in the cache: the last is not
    with pytest.raises(RequestTooLargeError, match="n=2"):
        validate_request([1] * 4, SamplingParams(max_tokens=8, n=2), **engine)
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 100"):
        validate_request([1] * 90, SamplingParams(max_tokens=20), **engine)
    with pytest.raises(RequestTooLargeError, match="max_num_seqs"):
        validate_request([1] * 8, SamplingParams(max_tokens=4, n=3), **{**engine, "max_num_seqs": 2})


def test_validate_request_limits_are_configurable():
    params = SamplingParams(n=20, logprobs=30)
    _, resolved = validate_request([1], params, max_model_len=MAX_LEN, vocab_size=VOCAB, max_n=32, max_logprobs=64)
    assert resolved.n == 20


def test_validate_request_rejects_a_non_params_object():
    with pytest.raises(ValueError, match="SamplingParams"):
        validate_request([1], {"temperature": 0}, max_model_len=MAX_LEN, vocab_size=VOCAB)


def test_prompt_ids_of_any_integer_type_come_back_as_plain_ints():
    for ids in ([3, 1, 4], np.array([3, 1, 4]), (np.int32(3), 1, np.int64(4))):
        out = validate_prompt_token_ids(ids, vocab_size=VOCAB)
        assert out == [3, 1, 4] and all(type(t) is int for t in out)
