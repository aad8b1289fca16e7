"""Streaming per API.md: joined deltas equal the non-stream text, one finish_reason per choice, the role chunk,
the include_usage chunk, [DONE] last, n > 1, stop strings, and no broken multi-byte characters."""

import json

import httpx
import openai
import pytest

from server_harness import API_KEY, MAIN_ARGS, shared_server, sse_events

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Write something long."}]


@pytest.fixture(scope="module")
def url(request):
    return shared_server(request, *MAIN_ARGS).url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def stream(http, path: str, body: dict) -> list:
    with http.stream("POST", path, json={"model": "tiny", "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert not any(isinstance(e, dict) and "error" in e for e in events), events
    return events[:-1]


def joined(events: list, key) -> dict[int, str]:
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + key(choice)
    return texts


def finish_reasons(events: list) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {}
    for event in events:
        for choice in event["choices"]:
            if choice["finish_reason"] is not None:
                reasons.setdefault(choice["index"], []).append(choice["finish_reason"])
    return reasons


def test_completion_stream_equals_non_stream(http):
    body = {"prompt": "Stream this", "max_tokens": 24, **GREEDY}
    full = http.post("/v1/completions", json={"model": "tiny", **body}).json()
    events = stream(http, "/v1/completions", body)
    assert joined(events, lambda c: c["text"]) == {0: full["choices"][0]["text"]}
    assert finish_reasons(events) == {0: ["length"]}
    assert all(e["id"] == events[0]["id"] and e["object"] == "text_completion" for e in events)


def test_chat_stream_starts_with_role_and_equals_non_stream(http):
    body = {"messages": CHAT, "max_tokens": 24, **GREEDY}
    full = http.post("/v1/chat/completions", json={"model": "tiny", **body}).json()
    events = stream(http, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["delta"] for e in events[1:] for c in e["choices"])
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert joined(events, lambda c: c["delta"].get("content", "")) == {0: full["choices"][0]["message"]["content"]}
    assert finish_reasons(events) == {0: ["length"]}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_include_usage_adds_one_final_usage_chunk(http, path):
    body = {"max_tokens": 9, "stream_options": {"include_usage": True}, **GREEDY}
    body |= {"prompt": "usage please"} if path == "/v1/completions" else {"messages": CHAT}
    events = stream(http, path, body)
    usage_chunks = [e for e in events if e.get("usage")]
    assert usage_chunks == [events[-1]] and events[-1]["choices"] == []
    non_stream = http.post(path, json={"model": "tiny", **{k: v for k, v in body.items()
                                                          if k != "stream_options"}}).json()
    assert events[-1]["usage"] == non_stream["usage"] and events[-1]["usage"]["completion_tokens"] == 9


def test_n2_stream_indexes_each_choice_once_finished(http):
    body = {"messages": CHAT, "max_tokens": 12, "n": 2, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    full = http.post("/v1/chat/completions", json={"model": "tiny", **body}).json()
    events = stream(http, "/v1/chat/completions", body)
    assert finish_reasons(events) == {0: ["length"], 1: ["length"]}
    texts = joined(events, lambda c: c["delta"].get("content", ""))
    assert texts == {c["index"]: c["message"]["content"] for c in full["choices"]}


def test_completion_batch_stream_indexes_prompt_times_n(http):
    body = {"prompt": ["first", "second"], "n": 2, "max_tokens": 5, "temperature": 0.8, "seed": 7,
            "ignore_eos": True}
    full = http.post("/v1/completions", json={"model": "tiny", **body}).json()
    events = stream(http, "/v1/completions", body)
    assert finish_reasons(events) == {i: ["length"] for i in range(4)}
    assert joined(events, lambda c: c["text"]) == {c["index"]: c["text"] for c in full["choices"]}


def test_stop_string_is_never_partly_streamed(http):
    full = http.post("/v1/completions", json={"model": "tiny", "prompt": "Stop me", "max_tokens": 40,
                                              **GREEDY}).json()["choices"][0]["text"]
    stop = full[6:14]
    events = stream(http, "/v1/completions", {"prompt": "Stop me", "max_tokens": 40, "stop": [stop], **GREEDY})
    assert joined(events, lambda c: c["text"]) == {0: full[:full.index(stop)]}
    assert finish_reasons(events) == {0: ["stop"]}


@pytest.mark.parametrize("seed", range(6))
def test_multibyte_text_is_never_broken_mid_character(http, seed):
    body = {"prompt": "emoji 🙂🎉 and 中文字符 and ü", "max_tokens": 24, "temperature": 1.5, "seed": seed,
            "ignore_eos": True}
    full = http.post("/v1/completions", json={"model": "tiny", **body}).json()["choices"][0]["text"]
    events = stream(http, "/v1/completions", body)
    deltas = [c["text"] for e in events for c in e["choices"]]
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


def test_openai_client_streams_chat(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, stream=True,
                                                 temperature=0, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8


def test_stream_events_are_single_line_json(http):
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "line\nbreaks\n", "stream": True,
                                                      "max_tokens": 8, "echo": True, **GREEDY}) as r:
        raw = r.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    assert json.loads(blocks[0][len("data: "):])["choices"][0]["text"] == "line\nbreaks\n"


def test_streamed_echo_and_logprobs_equal_non_stream(http):
    body = {"prompt": "echo and score", "max_tokens": 6, "echo": True, "logprobs": 2, **GREEDY}
    full = http.post("/v1/completions", json={"model": "tiny", **body}).json()["choices"][0]
    events = stream(http, "/v1/completions", body)
    pieces = [c["logprobs"] for e in events for c in e["choices"]]
    assert joined(events, lambda c: c["text"]) == {0: full["text"]}
    assert sum((p["tokens"] for p in pieces), []) == full["logprobs"]["tokens"]
    assert sum((p["token_logprobs"] for p in pieces), []) == pytest.approx(full["logprobs"]["token_logprobs"])
    assert sum((p["top_logprobs"] for p in pieces), []) == full["logprobs"]["top_logprobs"]
