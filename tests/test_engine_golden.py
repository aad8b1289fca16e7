"""LLM.generate against Hugging Face: greedy continuations and logprobs of every model family (float32, CPU)."""

import jax
import numpy as np
import pytest

from conftest import FAMILIES, golden
from jaxllm import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_hf(tiny_llm, family):
    g = golden(family)
    prompts = [{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in range(3)]
    outs = tiny_llm(family).generate(prompts, GREEDY, use_tqdm=False)
    for i, out in enumerate(outs):
        sample = out.outputs[0]
        assert sample.token_ids == g[f"greedy_{i}"].tolist(), f"{family} prompt {i}"
        assert sample.finish_reason == "length" and sample.stop_reason is None
        assert out.finished and out.prompt_token_ids == g[f"prompt_{i}"].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_log_softmax_of_raw_logits(tiny_llm, family):
    """logprobs=5: every generated token's logprob, rank and top-5 match log_softmax of HF's float32 logits."""
    g = golden(family)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    first, cont = tiny_llm(family).generate(
        [{"prompt_token_ids": g["prompt_0"].tolist()}, {"prompt_token_ids": g["prompt_2"].tolist()}], params,
        use_tqdm=False)
    # First generated token of prompt 0: HF's logits at the last prompt position.
    reference = np.asarray(jax.nn.log_softmax(g["logits_0"][-1]))
    entry = first.outputs[0].logprobs[0]
    token = first.outputs[0].token_ids[0]
    assert token == g["greedy_0"][0]
    assert entry[token].logprob == pytest.approx(reference[token], abs=1e-4) and entry[token].rank == 1
    assert sorted(entry, key=lambda t: entry[t].rank) == np.argsort(-reference)[:5].tolist()
    # Every step of prompt 2's continuation: greedy_logits_2[t] are the logits that chose greedy_2[t].
    sample = cont.outputs[0]
    assert sample.token_ids == g["greedy_2"].tolist() and len(sample.logprobs) == 32
    reference = np.asarray(jax.nn.log_softmax(g["greedy_logits_2"], axis=-1))
    for t, (token, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
        assert len(entry) == 5 and entry[token].rank == 1
        np.testing.assert_allclose([entry[i].logprob for i in np.argsort(-reference[t])[:5]],
                                   np.sort(reference[t])[::-1][:5], atol=1e-4, err_msg=f"{family} step {t}")
        assert entry[token].decoded_token == tiny_llm(family).get_tokenizer().decode([token],
                                                                                        skip_special_tokens=False)
    assert sample.cumulative_logprob == pytest.approx(sum(reference[t, tok] for t, tok in
                                                          enumerate(sample.token_ids)), abs=1e-3)
