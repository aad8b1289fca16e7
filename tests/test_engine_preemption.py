"""A KV pool too small for the load: preemption by swap and by recompute leaves greedy outputs unchanged, and a
request that could never fit is refused at once with a clear ValueError."""

import time

import numpy as np
import pytest

from jaxllm import SamplingParams

# llama3 fixture in float32: 2 layers x 2 kv heads x 16 tokens x 64 dims x (K, V) x 4 bytes per block.
BLOCK_BYTES = 2 * 2 * 2 * 16 * 64 * 4
SMALL = dict(max_model_len=128, kv_cache_memory_bytes=9 * BLOCK_BYTES)  # 8 usable blocks = one max_model_len
PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _load(count: int = 6):
    rng = np.random.default_rng(7)
    return [{"prompt_token_ids": rng.integers(5, 512, size=int(n)).tolist()} for n in rng.integers(10, 41, count)]


@pytest.fixture(scope="module")
def reference(tiny_llm):
    outs = tiny_llm("llama3").generate(_load(), PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(params=["swap", "recompute"])
def small_llm(request, tiny_llm):
    # swap_space is in GiB: 2 MiB holds 128 blocks, more than the load ever swaps out.
    return tiny_llm("llama3", **SMALL, swap_space=2 / 1024 if request.param == "swap" else 0), request.param


def _count_swaps(monkeypatch, engine) -> list:
    calls = []
    swap_out = engine.runner.swap_out

    def counting(pairs):
        calls.extend(pairs)
        swap_out(pairs)
    monkeypatch.setattr(engine.runner, "swap_out", counting)
    return calls


def test_preemption_keeps_greedy_outputs(small_llm, reference, monkeypatch):
    llm, mode = small_llm
    engine = llm.llm_engine
    assert engine.block_manager.num_usable_blocks == 8
    swapped = _count_swaps(monkeypatch, engine)
    before = engine.stats()
    outs = llm.generate(_load(), PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    after = engine.stats()
    assert after.num_preemptions_total > before.num_preemptions_total
    # Recomputed or swapped work is never counted twice.
    assert after.prompt_tokens_total - before.prompt_tokens_total == sum(len(p["prompt_token_ids"]) for p in _load())
    assert after.generation_tokens_total - before.generation_tokens_total == 6 * 40
    assert after.request_success_total.get("length", 0) - before.request_success_total.get("length", 0) == 6
    if mode == "swap":
        assert swapped, "preempted by recompute although swap space was available"
    else:
        assert not swapped and engine.block_manager.num_cpu_blocks == 0
    assert engine.block_manager.num_free_blocks == 8 and engine.block_manager.num_free_cpu_blocks == \
        engine.block_manager.num_cpu_blocks
    assert engine.stats().num_requests_running == engine.stats().num_requests_waiting == 0


def test_preemption_keeps_seeded_samples(small_llm, tiny_llm):
    llm, _ = small_llm
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=40, ignore_eos=True)
              for i in range(6)]
    before = llm.llm_engine.stats().num_preemptions_total
    outs = llm.generate(_load(), seeded, use_tqdm=False)
    assert llm.llm_engine.stats().num_preemptions_total > before
    expected = tiny_llm("llama3").generate(_load(), seeded, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]


@pytest.mark.timeout(60)
def test_request_that_can_never_fit_is_refused_at_add(tiny_llm):
    llm = tiny_llm("llama3", **SMALL, swap_space=0)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": list(range(5, 25))}
    start = time.monotonic()
    # Fits max_model_len but two samples need 15 blocks of an 8-block pool.
    with pytest.raises(ValueError, match=r"needs up to 15 KV blocks .* only 8 blocks"):
        llm.generate(prompt, SamplingParams(n=2, max_tokens=100), use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length is 128 tokens"):
        llm.generate(prompt, SamplingParams(max_tokens=109), use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length is 128 tokens"):
        llm.generate({"prompt_token_ids": list(range(5, 5 + 128))}, SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("too-long", prompt, SamplingParams(max_tokens=200))
    # A bad prompt in a list refuses the whole call and leaves nothing queued from the good ones before it.
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([prompt, {"prompt_token_ids": list(range(5, 200))}], SamplingParams(max_tokens=4),
                     use_tqdm=False)
    assert time.monotonic() - start < 10
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == 8
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=108, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 108 and out.outputs[0].finish_reason == "length"
