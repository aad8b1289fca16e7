"""The README's main job: `jaxllm serve` with no model serves SmolLM2-135M-Instruct, and the official `openai`
client can chat with it (one test: the real 135M model takes a while to load and compile on CPU)."""

import openai
import pytest

from server_harness import ServerProcess

pytestmark = pytest.mark.server


def test_jaxllm_serve_default_model_chats_with_the_openai_client():
    proc = ServerProcess("serve", entry=("-m", "serving.cli"))  # the code of the `jaxllm` console script
    try:
        url = proc.wait_ready(timeout=900)
        assert url.startswith("http://127.0.0.1:")  # binds loopback unless --host says otherwise
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        (model,) = client.models.list().data
        assert model.id == "SmolLM2-135M-Instruct"
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model=model.id, messages=question, max_tokens=30, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 30
        chunks = client.chat.completions.create(model=model.id, messages=question, max_tokens=30, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            reply.choices[0].message.content
    finally:
        assert proc.stop() == 0
