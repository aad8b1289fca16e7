"""Sampling semantics end to end: seeds, n > 1 with shared prompt blocks, stop strings and stop tokens, min_tokens,
max_tokens."""

import numpy as np
import pytest

from conftest import golden
from jaxllm import SamplingParams

EOS = 2  # the fixtures' <|eos|>


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 512, size=n).tolist()


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_repeats_across_runs_and_batch_compositions(tiny_llm):
    llm = tiny_llm("llama3")
    prompt = {"prompt_token_ids": _ids(3001, 23)}

    def seeded(seed):
        return SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=16, ignore_eos=True)

    alone = _tokens(llm.generate(prompt, seeded(11), use_tqdm=False))[0]
    assert _tokens(llm.generate(prompt, seeded(11), use_tqdm=False))[0] == alone
    # Among other requests: before it a long prompt whose chunks delay and split its prefill, around it unseeded
    # sampling, greedy and another seed; the request sits at a different row in every step.
    others = [{"prompt_token_ids": _ids(3002, 90)}, {"prompt_token_ids": _ids(3003, 7)}, prompt,
              {"prompt_token_ids": _ids(3004, 40)}, prompt]
    params = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), SamplingParams(temperature=0),
              seeded(11), SamplingParams(temperature=0.8, top_p=0.9, max_tokens=5, ignore_eos=True), seeded(12)]
    mixed = _tokens(llm.generate(others, params, use_tqdm=False))
    assert mixed[2] == alone
    assert mixed[4] != alone, "a different seed gave the same 16 tokens"
    assert _tokens(llm.generate(prompt, seeded(12), use_tqdm=False))[0] == mixed[4]
    greedy = _tokens(llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                  use_tqdm=False))[0]
    assert alone != greedy, "temperature 0.8 sampled exactly the greedy continuation"


def test_n4_returns_distinct_samples_sharing_the_prompt_blocks(tiny_llm):
    # No prefix caching, so any sharing comes from the n > 1 fork.
    engine = tiny_llm("llama3", enable_prefix_caching=False).llm_engine
    bm = engine.block_manager
    free_at_start = bm.num_free_blocks
    prompt = _ids(3100, 40)  # blocks 0-1 full (shared), block 2 partial: copied on write per sample
    engine.add_request("n4", {"prompt_token_ids": prompt}, SamplingParams(n=4, temperature=1.0, max_tokens=8,
                                                                           ignore_eos=True))
    most_used, forked_steps, final = 0, 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
        group = engine.scheduler.get_group("n4")
        if group is not None and len(group.seqs) == 4 and not group.is_finished():
            forked_steps += 1
            tables = [s.block_table for s in group.seqs]
            assert all(t[:2] == tables[0][:2] for t in tables), tables
            assert len({t[2] for t in tables if len(t) > 2}) == sum(len(t) > 2 for t in tables), tables
            most_used = max(most_used, free_at_start - bm.num_free_blocks)
    assert forked_steps >= 7
    # 2 shared prompt blocks + one own block per sample; four separate requests would hold 4 x 3 = 12.
    assert most_used == 2 + 4
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in final.outputs]
    assert all(len(s) == 8 for s in samples) and len(set(samples)) == 4
    assert bm.num_free_blocks == free_at_start


def _greedy_text(llm, prompt, max_tokens=32):
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(out.token_ids)
    ends = [len(tokenizer.decode(out.token_ids[:j + 1])) for j in range(len(out.token_ids))]
    return out.token_ids, out.text, ends


def _spanning_stop(text: str, ends: list[int]) -> tuple[str, int]:
    """A 4-character stop string made of the last 2 characters of token j - 1 and the first 2 of token j, whose
    first occurrence in text is exactly there; returns it and j."""
    for j in range(1, len(ends)):
        boundary = ends[j - 1]
        stop = text[boundary - 2:boundary + 2]
        if (boundary >= 2 and ends[j] >= boundary + 2 and stop.isascii() and stop.isprintable()
                and text.find(stop) == boundary - 2):
            return stop, j
    raise AssertionError(f"no usable token boundary in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tiny_llm, include):
    llm = tiny_llm("llama3")
    prompt = str(golden("llama3")["prompt_text_1"])
    tokens, text, ends = _greedy_text(llm, prompt)
    stop, j = _spanning_stop(text, ends)
    start = text.find(stop)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=["never-there", stop],
                            include_stop_str_in_output=include)
    engine = llm.llm_engine
    engine.add_request("stop", prompt, params)
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    final = texts[-1]
    assert final == (text[:start + len(stop)] if include else text[:start])
    # The stop string is never partly streamed: every intermediate text is a prefix of the final one.
    assert all(final.startswith(t) for t in texts)
    outs = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert outs.text == final and outs.finish_reason == "stop" and outs.stop_reason == stop
    assert outs.token_ids == tokens[:j + 1], "generation must stop at the token that completes the stop string"


def test_stop_string_applies_to_each_of_n_samples(tiny_llm):
    llm = tiny_llm("llama3")
    prompt = str(golden("llama3")["prompt_text_1"])
    _, text, ends = _greedy_text(llm, prompt)
    stop, _ = _spanning_stop(text, ends)
    out = llm.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=32, stop=stop), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.text == text[:text.find(stop)] and c.stop_reason == stop for c in out.outputs)


def test_stop_token_ids_end_the_output_and_are_not_in_the_text(tiny_llm):
    llm = tiny_llm("llama3")
    prompt = {"prompt_token_ids": golden("llama3")["prompt_0"].tolist()}
    tokens, text, _ = _greedy_text(llm, prompt)
    j = next(j for j in range(3, 32) if tokens[j] not in tokens[:j] and tokens[j] != EOS)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[tokens[j], 3]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:j + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tokens[j]
    assert out.text == llm.get_tokenizer().decode(tokens[:j])  # as vLLM: the stop token's text is left out
    with_it = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[tokens[j]],
                                                  include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert with_it.text == llm.get_tokenizer().decode(tokens[:j + 1])


def test_min_tokens_masks_eos_and_stop_ids_until_reached(tiny_llm):
    llm = tiny_llm("llama3")
    prompt = {"prompt_token_ids": _ids(3200, 12)}
    force_eos = {EOS: 100.0}  # EOS wins every step unless masked
    out = llm.generate(prompt, SamplingParams(temperature=0, logit_bias=force_eos), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] and out.finish_reason == "stop" and out.stop_reason is None and out.text == ""
    out = llm.generate(prompt, SamplingParams(temperature=0, logit_bias=force_eos, min_tokens=5),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and EOS not in out.token_ids[:5] and out.token_ids[5] == EOS
    assert out.finish_reason == "stop" and out.stop_reason is None
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(out.token_ids)
    # The EOS that stopped it is not in the text even when special tokens are kept (as vLLM).
    raw = llm.generate(prompt, SamplingParams(temperature=0, logit_bias=force_eos, min_tokens=5,
                                              skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    assert raw.token_ids == out.token_ids
    assert raw.text == tokenizer.decode(out.token_ids[:5], skip_special_tokens=False) and "<|eos|>" not in raw.text
    out = llm.generate(prompt, SamplingParams(temperature=0.7, seed=1, logit_bias={77: 100.0}, min_tokens=3,
                                              stop_token_ids=[77]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and 77 not in out.token_ids[:3] and out.token_ids[3] == 77
    assert out.stop_reason == 77
    out = llm.generate(prompt, SamplingParams(temperature=0, logit_bias=force_eos, ignore_eos=True, max_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] * 6 and out.finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [1, 7, 33])
def test_max_tokens_is_exact(tiny_llm, max_tokens):
    llm = tiny_llm("llama3")
    g = golden("llama3")
    out = llm.generate({"prompt_token_ids": g["prompt_1"].tolist()},
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == max_tokens and out.finish_reason == "length" and out.stop_reason is None
    assert out.token_ids[:32] == g["greedy_1"].tolist()[:max_tokens]


def test_prompt_logprobs_with_random_sampling(tiny_llm):
    llm = tiny_llm("llama3")
    prompt = {"prompt_token_ids": _ids(3300, 20)}
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)
    plain = llm.generate(prompt, seeded, use_tqdm=False)[0]
    try:
        out = llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True,
                                                  prompt_logprobs=1), use_tqdm=False)[0]
    finally:
        assert not llm.llm_engine.has_unfinished_requests()
    assert len(out.prompt_logprobs) == 20 and out.prompt_logprobs[0] is None
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
