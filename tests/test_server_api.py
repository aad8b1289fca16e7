"""The OpenAI routes against a real server on the tiny llama3 fixture: prompt forms, echo, logprobs, chat, the
official client, tokenize/detokenize, models and version."""

import httpx
import openai
import pytest

from server_harness import API_KEY, MAIN_ARGS, TINY_MODEL, shared_server

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def url(request):
    return shared_server(request, *MAIN_ARGS).url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(http, text: str, add_special_tokens: bool = True) -> list[int]:
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": add_special_tokens})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_models_lists_every_served_name(http):
    data = http.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == ["tiny", "tiny-alias"]
    assert all(m["max_model_len"] == 256 and m["object"] == "model" for m in data["data"])
    assert all(m["quantization"] is None for m in data["data"])  # a dense checkpoint
    assert http.get("/version").json()["version"]


def test_completion_reports_exact_usage_and_length_finish(http):
    out = complete(http, prompt="Hello there", max_tokens=7, **GREEDY)
    (choice,) = out["choices"]
    assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert out["usage"] == {"prompt_tokens": len(tokenize(http, "Hello there")), "completion_tokens": 7,
                            "total_tokens": len(tokenize(http, "Hello there")) + 7}


def test_alias_name_is_served_but_responses_use_the_first_name(http):
    r = http.post("/v1/completions", json={"model": "tiny-alias", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_every_prompt_form_gives_the_same_greedy_text(http):
    ids = tokenize(http, "The cat sat")
    by_text = complete(http, prompt="The cat sat", max_tokens=6, **GREEDY)["choices"][0]["text"]
    assert complete(http, prompt=ids, max_tokens=6, **GREEDY)["choices"][0]["text"] == by_text
    batch = complete(http, prompt=["The cat sat", "Other words"], max_tokens=6, **GREEDY)["choices"]
    assert [c["index"] for c in batch] == [0, 1] and batch[0]["text"] == by_text
    id_batch = complete(http, prompt=[ids, tokenize(http, "Other words")], max_tokens=6, **GREEDY)["choices"]
    assert [c["text"] for c in id_batch] == [c["text"] for c in batch]


def test_max_tokens_omitted_fills_the_context(http):
    ids = tokenize(http, "fill the context")
    out = complete(http, prompt=ids, ignore_eos=True, temperature=0)
    assert out["usage"]["completion_tokens"] == 256 - len(ids)
    assert out["choices"][0]["finish_reason"] == "length"


def test_echo_with_logprobs_covers_prompt_and_completion(http):
    ids = tokenize(http, "echo me")
    out = complete(http, prompt="echo me", max_tokens=4, echo=True, logprobs=2, **GREEDY)
    (choice,) = out["choices"]
    assert choice["text"].startswith("echo me") and len(choice["text"]) > len("echo me")
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4 == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_completion_logprobs_are_greedy_argmax(http):
    out = complete(http, prompt="pick the best", max_tokens=5, logprobs=3, **GREEDY)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and value == pytest.approx(max(top.values())) and top[token] == value


def test_chat_uses_the_template_and_reports_logprobs(http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 5,
                                                 "logprobs": True, "top_logprobs": 3, **GREEDY})
    assert r.status_code == 200, r.text
    out = r.json()
    (choice,) = out["choices"]
    assert out["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    rendered = ("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert out["usage"]["prompt_tokens"] == len(tokenize(http, rendered, add_special_tokens=False))
    tokenized = http.post("/tokenize", json={"messages": messages}).json()
    assert tokenized["count"] == out["usage"]["prompt_tokens"]
    content = choice["logprobs"]["content"]
    assert len(content) == 5
    assert all(len(c["top_logprobs"]) == 3 and c["logprob"] == pytest.approx(c["top_logprobs"][0]["logprob"])
               for c in content)


def test_openai_client_chat_and_completions(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    completion = client.completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 4
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)


def test_tokenize_detokenize_round_trip(http):
    text = "round trip: héllo 世界 🙂"
    ids = tokenize(http, text, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_stop_string_spanning_tokens_ends_the_text_before_it(http):
    full = complete(http, prompt="Tell me", max_tokens=40, **GREEDY)["choices"][0]["text"]
    assert len(full) > 12
    stop = full[5:12]  # seven characters: across several tokens of a 512-token vocabulary
    cut = complete(http, prompt="Tell me", max_tokens=40, stop=[stop], **GREEDY)["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == stop
    kept = complete(http, prompt="Tell me", max_tokens=40, stop=[stop], include_stop_str_in_output=True,
                    **GREEDY)["choices"][0]
    assert kept["text"] == full[:full.index(stop) + len(stop)]


def _prefix_hits(http) -> float:
    text = http.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_cache_salt_keeps_prefix_cache_blocks_apart(http):
    prompt = list(range(40, 120))  # 80 tokens: several full blocks to share
    body = {"prompt": prompt, "max_tokens": 2, **GREEDY}
    first = complete(http, **body, cache_salt="tenant-a")
    before = _prefix_hits(http)
    other = complete(http, **body, cache_salt="tenant-b")
    assert _prefix_hits(http) == before, "a different salt must not hit the other tenant's blocks"
    same = complete(http, **body, cache_salt="tenant-a")
    assert _prefix_hits(http) > before, "the same salt reuses its own cached prefix"
    assert first["choices"][0]["text"] == other["choices"][0]["text"] == same["choices"][0]["text"]


def test_a_quantized_model_is_reported_by_models_and_the_start_up_log(request):
    server = shared_server(request, "--model", TINY_MODEL, "--load-format", "dummy", "-q", "awq_marlin",
                           "--served-model-name", "tiny-awq", "--max-model-len", "256", "--enforce-eager",
                           "--kv-cache-memory-bytes", "4M")
    cards = httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"]
    assert [(m["id"], m["quantization"]) for m in cards] == [("tiny-awq", "awq")]  # the alias, resolved
    log = server.log()
    assert "(max_model_len 256, quantization awq)" in log
    assert "MiB of it packed linears); KV cache 4.00 MiB per device" in log
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-awq", "prompt": "Hello", "max_tokens": 3,
                                                         **GREEDY}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
