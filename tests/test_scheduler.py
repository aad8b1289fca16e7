"""Scheduler: budgets, decodes first, chunked prefill, preemption (swap and recompute), abort everywhere, n > 1
forks, prefix-cache accounting, stop conditions, and a randomized stress run checked against a fake KV cache."""

import random

import pytest

from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling.block_manager import NULL_BLOCK, BlockManager, cdiv
from jaxllm.scheduling.scheduler import Scheduler
from jaxllm.scheduling.sequence import SequenceGroup, SequenceStatus
from jaxllm.validation import validate_request

BS = 4
EOS = 0


class FakeRunner:
    """A KV cache of token ids: checks every context a step reads holds that sequence's tokens, and that no step
    writes a block another sequence can see."""

    def __init__(self, bm: BlockManager):
        self.bm, self.dev, self.cpu = bm, {}, {}

    def execute(self, out):
        bs = self.bm.block_size
        for dev, cpu in out.blocks_to_swap_out:
            self.cpu[cpu] = list(self.dev[dev])
        for cpu, dev in out.blocks_to_swap_in:
            self.dev[dev] = list(self.cpu[cpu])
        for src, dst in out.blocks_to_copy:
            self.dev[dst] = list(self.dev[src])
        written = set()
        for item in out.scheduled:
            seq, table = item.seq, item.block_table
            assert NULL_BLOCK not in table and len(table) == cdiv(item.seq_len, bs)
            for p in range(item.start_pos):
                assert self.dev[table[p // bs]][p % bs] == seq.token_ids[p], (seq, p)
            assert list(item.token_ids) == seq.token_ids[item.start_pos:item.seq_len]
            for p in range(item.start_pos, item.seq_len):
                block = table[p // bs]
                assert self.bm._ref[block] == 1 and self.bm._hash[block] is None, "write to a shared block"
                assert (block, p % bs) not in written
                written.add((block, p % bs))
                self.dev.setdefault(block, [None] * bs)[p % bs] = seq.token_ids[p]


def make_sched(num_blocks=64, num_cpu_blocks=0, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128,
               prefix_caching=True, preemption_mode=None, block_size=BS):
    bm = BlockManager(num_blocks, block_size, num_cpu_blocks, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len, preemption_mode=preemption_mode)


def req(rid, prompt_len=8, max_tokens=4, first=1, **params):
    return SequenceGroup(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens, **params),
                         eos_token_id=EOS)


def step(sched, runner=None, token=7):
    out = sched.schedule()
    if runner is not None:
        runner.execute(out)
    sched.update(out, [token] * len(out.scheduled))
    sched.block_manager.assert_consistent(sched.live_sequences())
    return out


def run_to_end(sched, runner=None, max_steps=500):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        step(sched, runner)
    raise AssertionError("requests never finished")


def assert_all_blocks_back(sched):
    bm = sched.block_manager
    bm.assert_consistent(sched.live_sequences())
    assert bm.num_free_blocks == bm.num_usable_blocks and bm.num_free_cpu_blocks == bm.num_cpu_blocks


def test_token_budget_and_max_num_seqs_are_respected():
    sched = make_sched(max_num_seqs=3, max_num_batched_tokens=10)
    for i in range(5):
        sched.add(req(f"r{i}", prompt_len=6))
    out = step(sched)
    assert out.num_batched_tokens == 10 and [s.num_tokens for s in out.scheduled] == [6, 4]
    for _ in range(10):
        out = step(sched)
        assert out.num_batched_tokens <= 10 and out.num_seqs <= 3
        assert sum(g.num_seqs_reserved for g in sched.running) <= 3
    run_to_end(sched)
    assert_all_blocks_back(sched)


def test_chunked_prefill_progression_samples_only_at_the_end():
    sched = make_sched(max_num_batched_tokens=8)
    sched.add(req("a", prompt_len=20))
    chunks = [step(sched).scheduled[0] for _ in range(3)]
    assert [(c.start_pos, c.num_tokens, c.do_sample) for c in chunks] == [(0, 8, False), (8, 8, False),
                                                                           (16, 4, True)]
    assert chunks[2].block_table[:2] == chunks[1].block_table[:2]
    decode = step(sched).scheduled[0]
    assert (decode.start_pos, decode.token_ids, decode.do_sample) == (20, (7,), True)


def test_decodes_go_first_and_prefills_fill_the_rest():
    sched = make_sched(max_num_batched_tokens=8)
    sched.add(req("a", prompt_len=4, max_tokens=10))
    step(sched)
    sched.add(req("b", prompt_len=30))
    out = step(sched)  # mixed batch: a's decode, then 7 prompt tokens of b
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert not out.decode_only
    sched.add(req("c", prompt_len=4, max_tokens=10))
    out = step(sched)
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    for _ in range(3):
        out = step(sched)
        assert out.scheduled[0].seq.request_id == "a" and out.scheduled[0].num_tokens == 1
    run_to_end(sched)
    assert_all_blocks_back(sched)


def test_a_long_prefill_never_starves_running_decodes():
    sched = make_sched(max_num_batched_tokens=8, max_num_seqs=8)
    for i in range(6):
        sched.add(req(f"d{i}", prompt_len=1, max_tokens=20, first=10 * i + 1))
    step(sched)
    sched.add(req("long", prompt_len=60, max_tokens=2))
    for _ in range(5):
        out = step(sched)
        decodes = [s for s in out.scheduled if s.seq.request_id.startswith("d")]
        assert len(decodes) == 6 and all(s.num_tokens == 1 for s in decodes)
        assert out.num_batched_tokens == 8
    assert step(sched).decode_only is False


def test_preemption_recompute_newest_first_and_outputs_resume():
    # 6 usable blocks of 4 tokens: two requests of 8 prompt + 12 output tokens cannot both fit.
    sched = make_sched(num_blocks=7, max_num_batched_tokens=32)
    runner = FakeRunner(sched.block_manager)
    sched.add(req("old", prompt_len=8, max_tokens=12, first=1))
    sched.add(req("new", prompt_len=8, max_tokens=12, first=100))
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        runner.execute(out)
        preempted += out.preempted_request_ids
        assert not out.blocks_to_swap_out
        sched.update(out, [5] * len(out.scheduled))
        sched.block_manager.assert_consistent(sched.live_sequences())
    assert preempted and set(preempted) == {"new"} and sched.num_preemptions == len(preempted)
    finished = {g.request_id: g for g in sched.take_finished()}
    assert [len(finished[r].seqs[0].output_token_ids) for r in ("old", "new")] == [12, 12]
    assert_all_blocks_back(sched)


def test_preemption_swaps_the_newest_when_the_cpu_pool_has_room():
    sched = make_sched(num_blocks=7, num_cpu_blocks=8, max_num_batched_tokens=32)
    runner = FakeRunner(sched.block_manager)
    sched.add(req("old", prompt_len=8, max_tokens=12, first=1))
    sched.add(req("new", prompt_len=8, max_tokens=12, first=100))
    swapped_out = swapped_in = 0
    for _ in range(100):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        runner.execute(out)
        assert set(out.preempted_request_ids) <= {"new"}
        swapped_out += len(out.blocks_to_swap_out)
        swapped_in += len(out.blocks_to_swap_in)
        if out.blocks_to_swap_out:
            assert sched.swapped[0].request_id == "new" and sched.num_swapped() == 1
        sched.update(out, [5] * len(out.scheduled))
        sched.block_manager.assert_consistent(sched.live_sequences())
    assert sched.num_preemptions >= 1 and swapped_out > 0 and swapped_in > 0
    assert [len(g.seqs[0].output_token_ids) for g in sched.take_finished()] == [12, 12]
    assert_all_blocks_back(sched)


def test_add_asserts_what_validation_promised_and_refuses_a_duplicate_id():
    sched = make_sched(num_blocks=5, max_model_len=100)  # 4 usable blocks = 16 tokens
    with pytest.raises(AssertionError):  # validate_request refuses it (RequestTooLargeError) before it gets here
        sched.add(req("big", prompt_len=10, max_tokens=8))
    sched.add(req("fits", prompt_len=10, max_tokens=7))  # 16 tokens in the cache: the last is never written
    with pytest.raises(AssertionError):
        sched.add(req("long", prompt_len=90, max_tokens=20))
    with pytest.raises(AssertionError):
        make_sched(max_num_seqs=2).add(req("many", n=3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(req("fits"))
    assert sched.request_ids() == ["fits"]
    run_to_end(sched)
    assert_all_blocks_back(sched)


def test_max_tokens_none_runs_up_to_max_model_len():
    sched = make_sched(max_model_len=12)
    group = req("a", prompt_len=8, max_tokens=None)
    sched.add(group)
    run_to_end(sched)
    assert group.seqs[0].num_tokens == 12 and group.seqs[0].finish_reason == "length"


def abort_everywhere_sched():
    return make_sched(num_blocks=13, num_cpu_blocks=16, max_num_batched_tokens=8)


def steps_until(sched, condition, max_steps=100):
    for _ in range(max_steps):
        if condition():
            return
        step(sched)
    raise AssertionError("condition never reached")


@pytest.mark.parametrize("where", ["queued", "mid_prefill", "mid_decode", "pending_fork", "forked", "swapped",
                                   "between_schedule_and_update"])
def test_abort_frees_everything_wherever_the_request_is(where):
    sched = abort_everywhere_sched()
    n = 3 if where in ("pending_fork", "forked") else 1
    victim = req("v", prompt_len=13, max_tokens=20 if where == "swapped" else 6, n=n, first=50, temperature=1.0)
    if where == "swapped":  # an older request that grows until the victim is swapped out
        sched.add(req("old", prompt_len=8, max_tokens=30, first=1))
        step(sched)
    sched.add(victim)
    if where == "mid_prefill":
        step(sched)
        assert 0 < victim.seqs[0].num_computed_tokens < 13
    elif where in ("mid_decode", "forked", "between_schedule_and_update"):
        steps_until(sched, lambda: victim.seqs[0].output_token_ids)
        assert len(victim.seqs) == n and victim.seqs[0].status is SequenceStatus.RUNNING
    elif where == "pending_fork":
        step(sched)
        assert victim.pending_fork and len(victim.seqs) == 1
    elif where == "swapped":
        steps_until(sched, lambda: victim in sched.swapped)
    out = sched.schedule() if where == "between_schedule_and_update" else None
    assert sched.abort("v") is victim
    assert all(s.status is SequenceStatus.FINISHED_ABORTED and s.finish_reason == "abort" for s in victim.seqs)
    assert sched.abort("v") is None
    if out is not None:
        assert sched.update(out, [1] * len(out.scheduled)) == [s.seq for s in out.scheduled
                                                                 if s.seq.request_id != "v"]
    run_to_end(sched)
    assert "v" not in [g.request_id for g in sched.take_finished()]
    assert_all_blocks_back(sched)


def test_n_samples_share_the_prompt_blocks_then_copy_on_write():
    sched = make_sched(max_num_batched_tokens=16)
    runner = FakeRunner(sched.block_manager)
    group = req("n4", prompt_len=10, max_tokens=3, n=4, temperature=1.0)
    sched.add(group)
    out = sched.schedule()
    runner.execute(out)
    assert [(s.start_pos, s.num_tokens, s.do_sample) for s in out.scheduled] == [(0, 9, False)]
    sched.update(out, [0])
    out = sched.schedule()  # fork: 4 samples each compute the last prompt token
    runner.execute(out)
    assert len(group.seqs) == 4 and [s.seq.sample_index for s in out.scheduled] == [0, 1, 2, 3]
    assert all((s.start_pos, s.token_ids, s.do_sample) == (9, (10,), True) for s in out.scheduled)
    tables = [s.block_table for s in out.scheduled]
    assert len({t[:2] for t in tables}) == 1  # full prompt blocks shared
    assert len({t[2] for t in tables}) == 4 and len(out.blocks_to_copy) == 3  # partial block: 3 copies + owner
    sched.update(out, [21, 22, 23, 24])
    assert [s.output_token_ids for s in group.seqs] == [[21], [22], [23], [24]]
    run_to_end(sched, runner)
    assert [s.finish_reason for s in group.seqs] == ["length"] * 4
    assert_all_blocks_back(sched)


def test_n_samples_with_a_block_aligned_prompt_need_no_copies():
    sched = make_sched(max_num_batched_tokens=16)
    group = req("n2", prompt_len=9, max_tokens=2, n=2, temperature=1.0)
    sched.add(group)
    step(sched)
    out = step(sched)
    assert not out.blocks_to_copy and out.scheduled[0].block_table[:2] == out.scheduled[1].block_table[:2]
    assert out.scheduled[0].block_table[2] != out.scheduled[1].block_table[2]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_forked_group_preempted_by_recompute_re_shares_its_prompt(prefix_caching):
    sched = make_sched(num_blocks=13, max_num_batched_tokens=32, prefix_caching=prefix_caching,
                       preemption_mode="recompute")
    runner = FakeRunner(sched.block_manager)
    sched.add(req("old", prompt_len=24, max_tokens=12))  # 6 blocks, growing to 9 of the 12
    group = req("forked", prompt_len=10, max_tokens=6, n=3, first=100, temperature=1.0)  # 3 shared, then 5
    sched.add(group)
    for _ in range(20):
        if "forked" in step(sched, runner).preempted_request_ids:
            break
    outputs = [list(s.output_token_ids) for s in group.seqs]
    assert len(outputs) == 3 and all(outputs) and group in sched.waiting and group.pending_fork
    sched.abort("old")
    hit = 8 if prefix_caching else 0
    out = step(sched, runner)  # the leader alone re-prefills the shared prompt, up to its last token
    assert [(s.seq.sample_index, s.start_pos, s.num_tokens, s.do_sample) for s in out.scheduled] == [
        (0, hit, 9 - hit, False)]
    out = step(sched, runner)  # then all samples adopt its blocks and recompute only their own tokens
    assert [(s.seq.sample_index, s.start_pos) for s in out.scheduled] == [(0, 9), (1, 9), (2, 9)]
    assert [list(s.token_ids[1:]) for s in out.scheduled] == outputs
    assert len({s.block_table[:2] for s in out.scheduled}) == 1 and all(s.do_sample for s in out.scheduled)
    run_to_end(sched, runner)
    assert all(s.num_output_tokens == 6 for s in group.seqs)
    assert_all_blocks_back(sched)


def test_prefix_cache_hits_skip_cached_tokens_and_are_counted():
    sched = make_sched(max_num_batched_tokens=64)
    runner = FakeRunner(sched.block_manager)
    a = req("a", prompt_len=18, max_tokens=2)
    sched.add(a)
    run_to_end(sched, runner)
    bm = sched.block_manager
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits, a.num_cached_tokens) == (18, 0, 0)
    b = req("b", prompt_len=18, max_tokens=2)
    sched.add(b)
    out = sched.schedule()
    runner.execute(out)
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_tokens) == (16, 2)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits, b.num_cached_tokens) == (36, 16, 16)
    sched.update(out, [3])
    run_to_end(sched, runner)
    # A prompt entirely in the cache recomputes its last block (at least one token must produce logits).
    c = req("c", prompt_len=16, max_tokens=2)
    sched.add(c)
    out = step(sched, runner)
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_tokens, c.num_cached_tokens) == (12, 4, 12)
    run_to_end(sched, runner)
    assert_all_blocks_back(sched)


def test_prompt_logprobs_requests_bypass_the_prefix_cache():
    sched = make_sched(max_num_batched_tokens=64)
    sched.add(req("a", prompt_len=12, max_tokens=1))
    run_to_end(sched)
    sched.add(req("b", prompt_len=12, max_tokens=1, prompt_logprobs=1))
    assert step(sched).scheduled[0].start_pos == 0


def test_different_salts_recompute_the_prefix():
    sched = make_sched(max_num_batched_tokens=64)
    for rid, salt in (("a", "x"), ("b", "y"), ("c", "x")):
        sched.add(SequenceGroup(rid, list(range(1, 13)), SamplingParams(max_tokens=1), cache_salt=salt))
        out = step(sched)
        run_to_end(sched)
        assert out.scheduled[0].start_pos == (8 if rid == "c" else 0)


@pytest.mark.parametrize("params,tokens,expected", [
    ({}, [3, EOS], ("stop", None, 2)),
    ({"ignore_eos": True}, [EOS, EOS, EOS, EOS], ("length", None, 4)),
    ({"stop_token_ids": [9]}, [3, 9], ("stop", 9, 2)),
    ({"min_tokens": 3}, [EOS, 9, EOS], ("stop", None, 3)),
    ({"min_tokens": 3, "stop_token_ids": [9]}, [9, 9, 9], ("stop", 9, 3)),
    ({}, [3, 3, 3, 3], ("length", None, 4)),
])
def test_stop_conditions_on_token_ids(params, tokens, expected):
    sched = make_sched()
    group = req("a", prompt_len=3, max_tokens=4, **params)
    sched.add(group)
    for token in tokens:
        assert not group.is_finished()
        out = sched.schedule()
        sched.update(out, [token])
    seq = group.seqs[0]
    assert (seq.finish_reason, seq.stop_reason, seq.num_output_tokens) == expected
    assert sched.take_finished() == [group] and not sched.has_unfinished()
    assert_all_blocks_back(sched)


def test_every_eos_id_stops():
    sched = make_sched()
    groups = [SequenceGroup(f"r{t}", [1, 2], SamplingParams(max_tokens=5), eos_token_id=[EOS, 9]) for t in (EOS, 9)]
    for group in groups:
        sched.add(group)
    out = sched.schedule()
    sched.update(out, [EOS, 9])
    assert [(g.seqs[0].finish_reason, g.seqs[0].stop_reason) for g in groups] == [("stop", None)] * 2


def test_finish_from_a_stop_string_frees_the_sequence():
    sched = make_sched()
    group = req("a", prompt_len=3, max_tokens=10)
    sched.add(group)
    step(sched)
    sched.finish(group.seqs[0], SequenceStatus.FINISHED_STOPPED, stop_reason="\n\n")
    assert group.seqs[0].finish_reason == "stop" and group.seqs[0].stop_reason == "\n\n"
    assert sched.take_finished() == [group] and sched.take_finished() == []
    assert sched.schedule().is_empty
    assert_all_blocks_back(sched)


def test_waiting_queue_is_first_come_first_served():
    sched = make_sched(num_blocks=9, max_num_batched_tokens=64)  # 8 blocks
    sched.add(req("hog", prompt_len=24, max_tokens=4))  # 6 blocks, then 7 once decoding
    step(sched)
    sched.add(req("big", prompt_len=12, max_tokens=4, first=100))  # needs 3 blocks: blocked
    sched.add(req("small", prompt_len=2, max_tokens=2, first=200))  # 1 block would fit, but waits its turn
    out = step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["hog"] and sched.num_waiting() == 2
    first_step = {}
    for i in range(50):
        for item in step(sched).scheduled:
            first_step.setdefault(item.seq.request_id, i)
        if not sched.has_unfinished():
            break
    assert first_step["big"] <= first_step["small"]
    assert_all_blocks_back(sched)


def _valid(sched: Scheduler, prompt: list[int], params: SamplingParams) -> bool:
    try:
        validate_request(prompt, params, max_model_len=sched.max_model_len, vocab_size=50,
                         max_num_seqs=sched.max_num_seqs, num_kv_blocks=sched.block_manager.num_usable_blocks,
                         block_size=sched.block_size)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("seed", range(40))
def test_randomized_stress_keeps_every_invariant(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 4, 8])
    scale = 4 // min(block_size, 4)  # a comparable pool in tokens
    sched = make_sched(num_blocks=rng.choice([10, 16, 30]) * scale, num_cpu_blocks=rng.choice([0, 6, 40]) * scale,
                       block_size=block_size, max_num_seqs=rng.choice([2, 4, 8]),
                       max_num_batched_tokens=rng.choice([8, 16, 40]), max_model_len=40,
                       prefix_caching=rng.random() < 0.7, preemption_mode=rng.choice([None, "recompute"]))
    bm, runner = sched.block_manager, FakeRunner(sched.block_manager)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    added, aborted, finished = set(), set(), set()

    def live_ids():
        return sched.request_ids()

    for i in range(120 if seed % 2 else 60):
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 14))]
            params = SamplingParams(max_tokens=rng.randrange(1, 12), n=rng.choice([1, 1, 2, 3]),
                                    min_tokens=rng.choice([0, 1]), prompt_logprobs=rng.choice([None, None, 1]))
            group = SequenceGroup(f"r{i}", prompt, params, eos_token_id=EOS, cache_salt=rng.choice([None, "s"]))
            if _valid(sched, prompt, params):  # as the engine: only validated requests reach the scheduler
                sched.add(group)
                added.add(group.request_id)
        if live_ids() and rng.random() < 0.1:
            rid = rng.choice(live_ids())
            assert sched.abort(rid) is not None
            aborted.add(rid)
        out = sched.schedule()
        runner.execute(out)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert out.num_seqs <= sched.max_num_seqs
        assert len({id(s.seq) for s in out.scheduled}) == out.num_seqs
        assert sum(g.num_seqs_reserved for g in sched.running) <= sched.max_num_seqs
        if live_ids() and rng.random() < 0.05:  # abort while the step "runs"
            rid = rng.choice(live_ids())
            sched.abort(rid)
            aborted.add(rid)
        sampled = [rng.choice([EOS, 1, 2, 3, 4, 5, 6, 7, 8]) for _ in out.scheduled]
        for seq in sched.update(out, sampled):
            if not seq.is_finished and rng.random() < 0.03:
                sched.finish(seq, SequenceStatus.FINISHED_STOPPED, "stop-string")
        finished |= {g.request_id for g in sched.take_finished()}
        bm.assert_consistent(sched.live_sequences())
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        runner.execute(out)
        sched.update(out, [rng.randrange(1, 9) for _ in out.scheduled])
        finished |= {g.request_id for g in sched.take_finished()}
        bm.assert_consistent(sched.live_sequences())
    assert not sched.has_unfinished(), "a request never finished"
    assert finished | aborted == added and not finished & aborted  # nothing lost, nothing twice
    assert_all_blocks_back(sched)
