"""prompt_logprobs and logprobs against HF's float32 logits: computed from the raw logits, across prefill chunks."""

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams

FIXTURE = "tests/fixtures/llama3"


@pytest.fixture(scope="module")
def llm():
    # A 16-token budget splits the 40-token prompt into chunks, so entries come from several steps.
    with LLM(model=FIXTURE, dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=1 << 24,
             max_num_batched_tokens=16, max_num_seqs=8, enable_prefix_caching=False) as llm:
        yield llm


def test_prompt_logprobs_match_hf_log_softmax(llm):
    golden = np.load(f"{FIXTURE}/golden.npz")
    prompt = golden["prompt_2"].tolist()
    reference = np.asarray(jax.nn.log_softmax(golden["logits_2"], axis=-1))
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3, logprobs=2))[0]
    entries = out.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        entry = entries[i]
        assert prompt[i] in entry and 3 <= len(entry) <= 4
        assert entry[prompt[i]].logprob == pytest.approx(reference[i - 1, prompt[i]], abs=1e-4)
        assert entry[prompt[i]].rank == 1 + int((reference[i - 1] > reference[i - 1, prompt[i]]).sum())
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:3]
        np.testing.assert_array_equal([t for t, _ in top], np.argsort(-reference[i - 1])[:3])
    first = out.outputs[0].logprobs[0]
    greedy = out.outputs[0].token_ids[0]
    assert greedy == golden["greedy_2"][0] and first[greedy].rank == 1 and len(first) == 2
    assert first[greedy].logprob == pytest.approx(reference[-1, greedy], abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)))


def test_prompt_logprobs_for_two_requests_in_one_batch_are_their_own(llm):
    golden = np.load(f"{FIXTURE}/golden.npz")
    prompts = [golden["prompt_0"].tolist(), golden["prompt_1"].tolist()]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))
    for i, (p, out) in enumerate(zip(prompts, outs)):
        reference = np.asarray(jax.nn.log_softmax(golden[f"logits_{i}"], axis=-1))
        assert len(out.prompt_logprobs) == len(p)
        got = [out.prompt_logprobs[j][p[j]].logprob for j in range(1, len(p))]
        np.testing.assert_allclose(got, [reference[j - 1, p[j]] for j in range(1, len(p))], atol=1e-4)
