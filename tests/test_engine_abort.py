"""Aborting a request wherever it is (queued, mid-prefill, mid-decode, n > 1, swapped out) returns every block and
leaves the other requests exact."""

import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.scheduling.sequence import SequenceStatus
from test_engine_preemption import SMALL

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 512, size=n).tolist()


@pytest.fixture
def engine(tiny_llm):
    # A 32-token budget: a 150-token prompt takes 5 steps to prefill.
    engine = tiny_llm("llama3").llm_engine
    start = (engine.block_manager.num_free_blocks, engine.block_manager.num_free_cpu_blocks)
    yield engine
    assert not engine.has_unfinished_requests()
    assert (engine.block_manager.num_free_blocks, engine.block_manager.num_free_cpu_blocks) == start
    engine.block_manager.assert_consistent(engine.scheduler.live_sequences())
    assert not engine.outputs._samples, "the output processor kept state of aborted requests"


def _seqs(engine, request_id):
    return engine.scheduler.get_group(request_id).seqs


def _finish(engine) -> dict:
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    return outputs


def test_abort_queued_and_mid_prefill(engine):
    engine.add_request("never-ran", {"prompt_token_ids": _ids(1, 30)}, GREEDY)
    engine.abort_request("never-ran")
    assert not engine.has_unfinished_requests()
    engine.add_request("long", {"prompt_token_ids": _ids(2, 150)}, GREEDY)
    engine.add_request("queued", {"prompt_token_ids": _ids(3, 30)}, GREEDY)
    engine.step()
    engine.step()
    long, queued = _seqs(engine, "long")[0], _seqs(engine, "queued")[0]
    assert long.status is SequenceStatus.RUNNING and 0 < long.num_computed_tokens < 150 and long.block_table
    assert queued.status is SequenceStatus.WAITING and not queued.block_table
    engine.abort_request("queued")
    engine.block_manager.assert_consistent(engine.scheduler.live_sequences())
    engine.abort_request(["long", "unknown-id"])
    assert engine.step() == []


def test_abort_mid_decode_leaves_the_other_request_exact(engine, tiny_llm):
    other = {"prompt_token_ids": _ids(5, 33)}
    engine.add_request("victim", {"prompt_token_ids": _ids(4, 20)}, GREEDY)
    engine.add_request("other", other, GREEDY)
    while _seqs(engine, "victim")[0].num_output_tokens < 3:
        engine.step()
    victim = _seqs(engine, "victim")[0]
    assert victim.status is SequenceStatus.RUNNING and len(victim.block_table) == 2
    (final,) = engine.abort_request("victim")
    assert final.request_id == "victim" and final.finished
    assert final.outputs[0].finish_reason == "abort" and final.outputs[0].token_ids == victim.output_token_ids
    assert victim.status is SequenceStatus.FINISHED_ABORTED and not victim.block_table
    outputs = _finish(engine)
    assert set(outputs) == {"other"}
    alone = tiny_llm("llama3").generate(other, GREEDY, use_tqdm=False)[0]
    assert outputs["other"].outputs[0].token_ids == alone.outputs[0].token_ids


@pytest.mark.parametrize("phase", ["before-fork", "after-fork"])
def test_abort_n_greater_than_1(engine, phase):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True)
    engine.add_request("n3", {"prompt_token_ids": _ids(6, 100)}, params)
    engine.step()
    if phase == "after-fork":
        while min(s.num_output_tokens for s in _seqs(engine, "n3")) < 2:
            engine.step()
        assert len(_seqs(engine, "n3")) == 3
    else:
        assert len(_seqs(engine, "n3")) == 1 and _seqs(engine, "n3")[0].block_table
    (final,) = engine.abort_request(["n3", "n3"])
    assert final.finished and all(c.finish_reason == "abort" for c in final.outputs)
    assert len(final.outputs) == (3 if phase == "after-fork" else 1)


def test_abort_swapped_out_requests_returns_cpu_blocks(tiny_llm):
    llm = tiny_llm("llama3", **SMALL, swap_space=2 / 1024)
    engine, bm = llm.llm_engine, llm.llm_engine.block_manager
    start = (bm.num_free_blocks, bm.num_free_cpu_blocks)
    for i in range(6):
        engine.add_request(f"r{i}", {"prompt_token_ids": _ids(10 + i, 30)}, SamplingParams(max_tokens=60,
                                                                                             ignore_eos=True))
    for _ in range(200):
        engine.step()
        if engine.scheduler.num_swapped():
            break
    swapped = [g.request_id for g in engine.scheduler.swapped]
    assert swapped and bm.num_free_cpu_blocks < start[1]
    engine.abort_request(swapped)
    bm.assert_consistent(engine.scheduler.live_sequences())
    engine.abort_request(engine.scheduler.request_ids())
    assert not engine.has_unfinished_requests() and (bm.num_free_blocks, bm.num_free_cpu_blocks) == start


def test_aborting_some_of_many_in_flight_requests_leaves_the_rest_exact(engine, tiny_llm):
    prompts = [{"prompt_token_ids": _ids(100 + i, 5 + 7 * i % 60)} for i in range(30)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"m{i}", p, params)
    for _ in range(4):
        engine.step()
    victims = [f"m{i}" for i in range(0, 30, 6)]  # some decoding, some mid-prefill, some still queued
    assert {o.request_id for o in engine.abort_request(victims)} == set(victims)
    outputs = _finish(engine)
    assert set(outputs) == {f"m{i}" for i in range(30)} - set(victims)
    kept = [i for i in range(30) if f"m{i}" not in victims]
    expected = tiny_llm("llama3").generate([prompts[i] for i in kept], params, use_tqdm=False)
    assert [outputs[f"m{i}"].outputs[0].token_ids for i in kept] == [o.outputs[0].token_ids for o in expected]


def test_many_short_requests_leave_no_state_behind(engine):
    engine_state = _state_sizes(engine)
    for round_ in range(3):
        for i in range(100):
            engine.add_request(f"s{round_}-{i}", {"prompt_token_ids": _ids(i, 3 + i % 20)},
                               SamplingParams(temperature=0, max_tokens=1 + i % 3,
                                              prompt_logprobs=1 if i % 10 == 0 else None))
        outputs = _finish(engine)
        assert len(outputs) == 100
    assert _state_sizes(engine) == engine_state


def _state_sizes(engine) -> tuple[int, ...]:
    """How many requests the engine's per-request tables hold."""
    return (len(engine.outputs._prompt_logprobs._recorded), len(engine.outputs._samples),
            len(engine.step_builder._constants), engine.get_num_unfinished_requests())
