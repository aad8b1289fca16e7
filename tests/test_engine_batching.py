"""Continuous batching does not change results: 64 mixed-length prompts in one call give each prompt's own tokens."""

import numpy as np
import pytest

from jaxllm import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llm):
    # No prefix caching: the lone runs must not reuse the batched run's KV. max_num_seqs 8 and a 32-token budget make
    # requests join and leave a running batch, with prompts chunked across steps and mixed with decodes.
    return tiny_llm("llama3", enable_prefix_caching=False)


def _mixed_prompts(count: int = 64):
    rng = np.random.default_rng(64)
    prompts, params = [], []
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras".split()
    for i in range(count):
        if i % 8 == 3:  # some text prompts among the token-id ones
            prompts.append(" ".join(rng.choice(words, size=int(rng.integers(1, 30)))))
        else:
            length = int(rng.choice([1, 2, 15, 16, 17, 31, 33, int(rng.integers(3, 120))]))
            prompts.append({"prompt_token_ids": rng.integers(5, 512, size=length).tolist()})
        params.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 12)), ignore_eos=True))
    return prompts, params


def test_64_mixed_prompts_in_one_call_equal_each_alone(llm):
    prompts, params = _mixed_prompts()
    batched = llm.generate(prompts, params, use_tqdm=False)
    assert len(batched) == 64
    tokenizer = llm.get_tokenizer()
    for prompt, p, out in zip(prompts, params, batched):  # output order is input order
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt["prompt_token_ids"]
        assert out.prompt_token_ids == ids
        assert out.prompt == (prompt if isinstance(prompt, str) else None)
        assert len(out.outputs[0].token_ids) == p.max_tokens and out.outputs[0].finish_reason == "length"
    for i, (prompt, p, out) in enumerate(zip(prompts, params, batched)):
        alone = llm.generate(prompt, p, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, f"prompt {i}"
        assert out.outputs[0].text == alone.outputs[0].text
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_usable_blocks


def test_identical_greedy_requests_in_one_batch_agree(llm):
    prompt = {"prompt_token_ids": list(range(100, 140))}
    outs = llm.generate([prompt] * 16, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
