"""Run-ahead scheduling (step N + 1 dispatched before step N's tokens are read) changes nothing but speed: the same
tokens, texts, finish reasons and counters as one step at a time, including early stops it cannot foresee."""

import numpy as np

from jaxllm import SamplingParams


def _workload(tokenizer):
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(5, 512, int(n)).tolist()} for n in rng.integers(3, 90, 12)]
    params = [
        SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=bool(i % 2)) for i, m in enumerate(range(1, 9))
    ] + [
        SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=20),  # seeded, may stop at EOS
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True),  # forks, copy-on-write
        SamplingParams(temperature=0.7, seed=3, max_tokens=15, presence_penalty=0.5, repetition_penalty=1.2),
        SamplingParams(temperature=0, max_tokens=30, stop=["e"], ignore_eos=True),  # stops on text mid-flight
    ]
    return prompts, params


def _summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def test_run_ahead_gives_exactly_the_one_step_at_a_time_results(tiny_llm):
    ahead = tiny_llm("llama3")
    in_order = tiny_llm("llama3", async_scheduling=False)
    prompts, params = _workload(ahead.get_tokenizer())
    results = []
    for llm in (ahead, in_order):
        before = llm.llm_engine.stats()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        after = llm.llm_engine.stats()
        results.append((_summary(outputs), after.generation_tokens_total - before.generation_tokens_total,
                        after.prompt_tokens_total - before.prompt_tokens_total))
        free = llm.llm_engine.block_manager.num_free_blocks
        assert free == llm.llm_engine.block_manager.num_usable_blocks
    assert results[0] == results[1]
    finish = {c[2] for o in results[0][0] for c in o}
    assert finish == {"length", "stop"}, "the workload must end requests both ways"


def test_a_step_dispatched_past_a_stop_is_discarded_by_the_next_generate(tiny_llm):
    llm = tiny_llm("llama3")
    prompt = {"prompt_token_ids": list(range(20, 40))}
    text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    assert first.outputs[0].finish_reason == "stop" and first.outputs[0].text == text[:text.index(stop)]
    # The stop was found on text after the next step had been dispatched: that step is still in flight, unread.
    assert llm.llm_engine._in_flight is not None
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_usable_blocks


def test_aborting_while_a_step_runs_ahead_reports_only_real_tokens(tiny_llm):
    engine = tiny_llm("llama3").llm_engine
    engine.add_request("a", {"prompt_token_ids": list(range(30, 50))},
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    while not engine.step():  # until the first token comes back
        pass
    engine.step()
    assert engine._in_flight is not None  # the next token is being computed right now
    (final,) = engine.abort_request("a")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) == 2 and min(final.outputs[0].token_ids) >= 0
    assert engine.step() == [] and not engine.has_unfinished_requests()
