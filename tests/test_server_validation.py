"""Every bad request gets a 4xx in OpenAI's error shape (400 for validation, never 422 or 500), fails only itself
(a normal request succeeds right after), and leaks no stack trace or path."""

import json
import math
import time

import httpx
import pytest

from server_harness import API_KEY, MAIN_ARGS, shared_server

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = "word " * 400  # > 256 tokens with a 512-token vocabulary

COMPLETION_CASES = {
    "prompt_over_max_model_len": ({"prompt": LONG, "max_tokens": 1}, "context_length_exceeded"),
    "prompt_plus_max_tokens_over": ({"prompt": "hi", "max_tokens": 300}, "context_length_exceeded"),
    "max_tokens_huge": ({"prompt": "hi", "max_tokens": 10**12}, "context_length_exceeded"),
    "max_tokens_zero": ({"prompt": "hi", "max_tokens": 0}, None),
    "max_tokens_negative": ({"prompt": "hi", "max_tokens": -5}, None),
    "max_tokens_float": ({"prompt": "hi", "max_tokens": 1.5}, None),
    "max_tokens_string": ({"prompt": "hi", "max_tokens": "ten"}, None),
    "temperature_negative": ({"prompt": "hi", "temperature": -0.5}, None),
    "top_p_zero": ({"prompt": "hi", "top_p": 0}, None),
    "top_p_above_one": ({"prompt": "hi", "top_p": 1.5}, None),
    "top_k_below_minus_one": ({"prompt": "hi", "top_k": -2}, None),
    "min_p_negative": ({"prompt": "hi", "min_p": -0.1}, None),
    "min_p_above_one": ({"prompt": "hi", "min_p": 1.5}, None),
    "presence_penalty": ({"prompt": "hi", "presence_penalty": 3}, None),
    "frequency_penalty": ({"prompt": "hi", "frequency_penalty": -3}, None),
    "repetition_penalty": ({"prompt": "hi", "repetition_penalty": 0}, None),
    "n_zero": ({"prompt": "hi", "n": 0}, None),
    "n_over_max_num_seqs": ({"prompt": "hi", "n": 65, "max_tokens": 2}, None),  # refused before the engine thread
    "best_of_not_n": ({"prompt": "hi", "best_of": 3}, None),
    "empty_prompt": ({"prompt": ""}, None),
    "empty_list": ({"prompt": []}, None),
    "empty_inner_list": ({"prompt": [[]]}, None),
    "one_empty_in_batch": ({"prompt": [[5, 6], []]}, None),
    "negative_token_id": ({"prompt": [5, -1]}, None),
    "token_id_out_of_vocab": ({"prompt": [5, 512]}, None),
    "prompt_wrong_type": ({"prompt": {"text": "hi"}}, None),
    "prompt_missing": ({"max_tokens": 3}, None),
    "logprobs_over_20": ({"prompt": "hi", "logprobs": 21}, None),
    "empty_stop_string": ({"prompt": "hi", "stop": [""]}, None),
    "too_many_stop_strings": ({"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, None),
    "stop_string_too_long": ({"prompt": "hi", "stop": ["x" * 300]}, None),
    "stream_options_without_stream": ({"prompt": "hi", "stream_options": {"include_usage": True}}, None),
    "logit_bias_key_not_int": ({"prompt": "hi", "logit_bias": {"abc": 1}}, None),
    "logit_bias_key_out_of_vocab": ({"prompt": "hi", "logit_bias": {"999999": 1}}, None),
    "logit_bias_key_negative": ({"prompt": "hi", "logit_bias": {"-1": 1}}, None),
    "stop_token_id_out_of_vocab": ({"prompt": "hi", "stop_token_ids": [4096]}, None),
    "suffix": ({"prompt": "hi", "suffix": "tail"}, None),
}

CHAT_CASES = {
    "empty_messages": {"messages": []},
    "messages_missing": {"max_tokens": 2},
    "unknown_role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "null_content": {"messages": [{"role": "user", "content": None}]},
    "image_content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    "top_logprobs_over_20": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
    "top_logprobs_without_logprobs": {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    "tools": {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    "max_completion_tokens_zero": {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
}


@pytest.fixture(scope="module")
def http(request):
    url = shared_server(request, *MAIN_ARGS).url
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    for leak in ("Traceback", 'File "', "/work", "site-packages", ".py"):
        assert leak not in r.text
    return error


def assert_still_serving(http) -> None:
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("case", sorted(COMPLETION_CASES))
def test_completion_validation(http, case):
    body, code = COMPLETION_CASES[case]
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", **body}), 400, code)
    assert error["type"] == "invalid_request_error"
    assert_still_serving(http)


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_validation(http, case):
    assert_error(http.post("/v1/chat/completions", json={"model": "tiny", **CHAT_CASES[case]}), 400)
    assert_still_serving(http)


def test_validation_messages_name_the_field(http):
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "top_p": 7}), 400)
    assert "top_p" in error["message"] and error["param"] == "top_p"
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": "x"}),
                         400)
    assert error["param"] == "max_tokens"


@pytest.mark.parametrize("steering, message", [
    ({"1": [0.5] * 3}, "steering[1] must have 64 values"),
    ({"3": [0.5] * 64}, "steering layers must be in [1, 2]"),
    ({"x": [0.5] * 64}, "steering keys must be integer"),
    ({"1": "abc"}, None),  # not a list: pydantic refuses it
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_bad_steering_is_refused_naming_the_field(http, route, steering, message):
    body = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(http.post(route, json={"model": "tiny", **body, "steering": steering}), 400)
    assert error["param"] == "steering" or "steering" in error["message"]
    if message is not None:
        assert message in error["message"] and error["param"] == "steering"
    assert_still_serving(http)


def test_nan_in_a_steering_vector_is_refused(http):
    raw = '{"model": "tiny", "prompt": "hi", "steering": {"1": [NaN' + ", 0.5" * 63 + "]}}"
    assert_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert_still_serving(http)


def test_steering_over_http_changes_the_completion(http):
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    steered = http.post("/v1/completions", json={**body, "steering": {2: [300.0] * 64}}).json()
    assert "choices" in steered and steered["choices"][0]["text"] != plain


def test_n_huge_is_refused_fast(http):
    started = time.monotonic()
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "n": 10**6}), 400)
    assert time.monotonic() - started < 1.0
    assert_still_serving(http)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(http, value):
    raw = f'{{"model": "tiny", "prompt": "hi", "temperature": {value}}}'
    assert_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert_still_serving(http)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"a string"', b"", b"\xff\xfe\x00", b"null",
                                 b"[" * 100_000])
def test_bodies_that_are_not_a_json_object(http, raw):
    assert_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert_still_serving(http)


def test_wrong_content_type(http):
    body = json.dumps({"model": "tiny", "prompt": "hi"})
    assert_error(http.post("/v1/completions", content=body, headers={"Content-Type": "text/plain"}), 400)
    assert_still_serving(http)


def test_unknown_model_is_404_naming_the_param(http):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        error = assert_error(http.post(path, json={"model": "../../etc/passwd", **body}), 404, "model_not_found")
        assert error["param"] == "model"
    assert_still_serving(http)


def test_twenty_megabyte_body_is_refused_before_parsing(http):
    body = b'{"model": "tiny", "prompt": "' + b"a" * (20 * 2**20) + b'"}'
    assert_error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(20):
            yield b"a" * 2**20
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    assert_still_serving(http)


def test_huge_headers_are_refused(http):
    # One giant header may be stopped by h11 itself (a plain 400) or, if it arrived in one read, by the server.
    assert http.get("/v1/models", headers={"X-Big": "a" * 200_000}).status_code in (400, 431)
    many = {f"X-Part-{i}": "a" * 8000 for i in range(12)}
    assert_error(http.get("/v1/models", headers=many), 431)
    assert_still_serving(http)


def test_unknown_route_and_method_use_the_error_shape(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1, "frobnicate": True,
                                           "user": "u1"})
    assert r.status_code == 200
    assert not math.isnan(r.json()["usage"]["total_tokens"])
