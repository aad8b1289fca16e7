"""The KV cache is donated into every step and updated in place: never copied, on any path that writes it. The
step's inputs (one buffer per bucket), its logits and the sampled ids fed back to the next step keep their device
address from step to step too, so on a GPU XLA need not update the step's CUDA graph for them."""

import numpy as np
import pytest

from jaxllm import EngineConfig, LLMEngine, SamplingParams

FIXTURE = "tests/fixtures/llama3"


@pytest.fixture(scope="module")
def engine():
    engine = LLMEngine(EngineConfig(model=FIXTURE, dtype="float32", enforce_eager=True, max_model_len=128,
                                    kv_cache_memory_bytes=1 << 22, max_num_seqs=8, max_num_batched_tokens=64))
    yield engine
    engine.close()


def _pointers(kv_cache):
    return [a.unsafe_buffer_pointer() for a in kv_cache.k + kv_cache.v]


def test_steps_update_the_cache_in_place(engine):
    rng = np.random.default_rng(0)
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(5, 500, 20 + 13 * i).tolist()},
                           SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    before = engine.runner.kv_cache
    pointers = _pointers(before)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    after = engine.runner.kv_cache
    assert steps > 3
    assert all(a.is_deleted() for a in before.k + before.v), "the step did not consume (donate) the old cache"
    assert _pointers(after) == pointers, "the cache moved: some step copied it instead of updating it in place"


def test_block_copies_and_swaps_update_the_cache_in_place(engine):
    runner = engine.runner
    engine.add_request("own", {"prompt_token_ids": list(range(5, 45))},
                       SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.step()  # the 40-token prompt in one step: its keys are in the blocks of its table
    table = list(engine.scheduler.get_group("own").seqs[0].block_table)
    while engine.has_unfinished_requests():
        engine.step()
    src = table[0]
    a, b, c = [block for block in range(1, runner.kv_plan.num_blocks) if block not in table][:3]
    pointers = _pointers(runner.kv_cache)
    k_before = np.asarray(runner.kv_cache.k[0][:, src])
    assert np.abs(k_before).sum() > 0, "the request's first block should hold its keys"
    runner.copy_blocks([(src, a)])
    np.testing.assert_array_equal(np.asarray(runner.kv_cache.k[0][:, a]), k_before)
    runner.swap_out([(src, 0)])
    runner.copy_blocks([(b, src)])  # overwrite the block, then bring the swapped copy back into another one
    runner.swap_in([(0, c)])
    np.testing.assert_array_equal(np.asarray(runner.kv_cache.k[0][:, c]), k_before)
    assert _pointers(runner.kv_cache) == pointers


def test_step_inputs_and_outputs_keep_their_device_address(engine):
    runner = engine.runner
    staged, steps = {}, []
    stage = runner._stage
    # The logits buffer and the fed-back ids: each step's output is written over the buffer the step was given.
    fixed = {"logits": {runner._logits.unsafe_buffer_pointer()}, "ids": {runner._last_tokens.unsafe_buffer_pointer()}}

    def recording(layout, fresh):
        fixed["logits"].add(runner._logits.unsafe_buffer_pointer())
        fixed["ids"].add(runner._last_tokens.unsafe_buffer_pointer())
        out = stage(layout, fresh)
        staged.setdefault(layout, set()).add(out.unsafe_buffer_pointer())
        steps.append(layout)
        return out

    runner._stage = recording
    try:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(5, 500, n).tolist() for n in (9, 31, 17)]
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        for i, ids in enumerate(prompts):
            engine.add_request(f"s{i}", {"prompt_token_ids": ids}, greedy)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    finally:
        runner._stage = stage
    assert len(steps) > 2 * len(staged), steps  # buckets were reused
    assert all(len(addresses) == 1 for addresses in staged.values()), staged  # one address per bucket
    assert all(len(addresses) == 1 for addresses in fixed.values()), fixed
    # The same requests one at a time (fresh buckets, a different mix per step) give the same greedy tokens.
    for i, ids in enumerate(prompts):
        engine.add_request(f"alone{i}", {"prompt_token_ids": ids}, greedy)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    assert o.outputs[0].token_ids == outputs[f"s{i}"], i
