"""Prefix caching: hits change no output, are counted exactly, and different cache salts never share blocks."""

import numpy as np

from jaxllm import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(5, 512, size=n).tolist()


def test_prefix_cache_hits_give_identical_outputs_and_are_counted(tiny_llm):
    llm, uncached = tiny_llm("llama3"), tiny_llm("llama3", enable_prefix_caching=False)
    prefix = _ids(1001, 48)  # three full blocks of 16
    first = {"prompt_token_ids": prefix + _ids(1002, 5)}
    later = [{"prompt_token_ids": prefix + _ids(1003, 16)},  # 64 tokens: the last block must still be computed
             {"prompt_token_ids": prefix + _ids(1004, 30)},
             first]
    before = llm.llm_engine.stats()
    out_first = llm.generate(first, PARAMS, use_tqdm=False)[0]
    assert out_first.num_cached_tokens == 0
    middle = llm.llm_engine.stats()
    assert middle.prefix_cache_hits_total == before.prefix_cache_hits_total
    assert middle.prefix_cache_queries_total == before.prefix_cache_queries_total + 53
    outs = llm.generate(later, PARAMS, use_tqdm=False)
    after = llm.llm_engine.stats()
    assert [o.num_cached_tokens for o in outs] == [48, 48, 48]
    assert after.prefix_cache_hits_total - middle.prefix_cache_hits_total == 3 * 48
    assert after.prefix_cache_queries_total - middle.prefix_cache_queries_total == 64 + 78 + 53
    expected = uncached.generate([first] + later, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in [out_first] + outs] == [o.outputs[0].token_ids for o in expected]
    assert outs[2].outputs[0].token_ids == out_first.outputs[0].token_ids
    assert uncached.llm_engine.stats().prefix_cache_hits_total == 0


def _run(engine, request_ids) -> dict:
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    assert set(outputs) == set(request_ids)
    return outputs


def test_different_cache_salts_never_share_blocks(tiny_llm):
    engine = tiny_llm("llama3").llm_engine
    prompt = {"prompt_token_ids": _ids(2001, 40)}  # two full blocks
    engine.add_request("salt-a1", prompt, PARAMS, cache_salt="tenant-a")
    engine.step()
    blocks_a1 = set(engine.scheduler.get_group("salt-a1").seqs[0].block_table)
    first = _run(engine, ["salt-a1"])["salt-a1"]
    assert first.num_cached_tokens == 0

    hits = engine.stats().prefix_cache_hits_total
    engine.add_request("salt-b", prompt, PARAMS, cache_salt="tenant-b")
    engine.add_request("no-salt", prompt, PARAMS)
    engine.add_request("salt-a2", prompt, PARAMS, cache_salt="tenant-a")
    engine.step()
    tables = {rid: engine.scheduler.get_group(rid).seqs[0].block_table for rid in ("salt-b", "no-salt", "salt-a2")}
    assert set(tables["salt-a2"][:2]) <= blocks_a1, "the same salt must hit its own cached blocks"
    assert not set(tables["salt-b"]) & blocks_a1 and not set(tables["no-salt"]) & blocks_a1
    assert not set(tables["salt-b"]) & set(tables["salt-a2"]) and not set(tables["salt-b"]) & set(tables["no-salt"])
    outs = _run(engine, ["salt-b", "no-salt", "salt-a2"])
    assert engine.stats().prefix_cache_hits_total - hits == 32
    assert [outs[r].num_cached_tokens for r in ("salt-b", "no-salt", "salt-a2")] == [0, 0, 32]
    assert all(outs[r].outputs[0].token_ids == first.outputs[0].token_ids for r in outs)
    # Once tenant b's blocks are cached, tenant b hits them and still never tenant a's.
    engine.add_request("salt-b2", prompt, PARAMS, cache_salt="tenant-b")
    engine.step()
    table = engine.scheduler.get_group("salt-b2").seqs[0].block_table
    assert not set(table) & blocks_a1
    assert _run(engine, ["salt-b2"])["salt-b2"].num_cached_tokens == 32
