"""StepBuilder: SchedulerOutput -> StepWork, the engine/runtime boundary. Run-ahead placeholders become references
to the previous step's rows, sampling constants are cached per sample until forgotten, penalties turn run-ahead
off, and prompt logprobs bring every computed token's successor. Plain host code: no device."""

from jaxllm.runtime.inputs import fed_token
from jaxllm.runtime.step_builder import StepBuilder
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduling import BlockManager, Scheduler, SequenceGroup
from jaxllm.scheduling.sequence import RUN_AHEAD_TOKEN


def _scheduler(budget: int = 32) -> Scheduler:
    return Scheduler(BlockManager(64, 4, 0, enable_prefix_caching=False), max_num_seqs=4,
                     max_num_batched_tokens=budget, max_model_len=64)


def _group(request_id: str, prompt_len: int, **params) -> SequenceGroup:
    group = SequenceGroup(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8, **params),
                          eos_token_id=0)
    group.seed = 7
    return group


def _builder() -> StepBuilder:
    return StepBuilder(vocab_size=100, eos_token_ids=[0])


def test_run_ahead_placeholders_refer_to_the_previous_steps_rows():
    scheduler, builder = _scheduler(), _builder()
    scheduler.add(_group("a", 5))
    scheduler.add(_group("b", 3, temperature=0.7))
    first = scheduler.schedule()
    step = builder.build(first, None)
    assert [list(w.token_ids) for w in step.work] == [[1, 2, 3, 4, 5], [1, 2, 3]]
    assert [r.position for r in step.sampling] == [5, 3]
    assert not step.reads_history and step.prompt_logprobs_k is None
    scheduler.run_ahead(first)
    second = scheduler.schedule()
    assert [s.token_ids for s in second.scheduled] == [(RUN_AHEAD_TOKEN,), (RUN_AHEAD_TOKEN,)]
    step = builder.build(second, first)
    assert [list(w.token_ids) for w in step.work] == [[fed_token(0)], [fed_token(1)]]
    assert [r.position for r in step.sampling] == [6, 4]


def test_constants_are_cached_per_sample_until_the_request_is_forgotten():
    scheduler, builder = _scheduler(), _builder()
    group = _group("a", 5, temperature=0.5, top_k=3)
    scheduler.add(group)
    batch = scheduler.schedule()
    constants = builder.build(batch, None).sampling[0].constants
    assert (constants.temperature, constants.top_k, constants.seed, constants.stop_ids) == (0.5, 3, 7, (0,))
    assert builder.build(batch, None).sampling[0].constants is constants
    builder.forget(group)
    assert builder.build(batch, None).sampling[0].constants is not constants


def test_a_prompt_chunk_that_does_not_sample_gets_a_greedy_padding_row():
    scheduler, builder = _scheduler(budget=16), _builder()
    scheduler.add(_group("a", 40, temperature=1.0))
    step = builder.build(scheduler.schedule(), None)
    assert len(step.work[0].token_ids) == 16 and step.sampling[0].constants.greedy


def test_penalties_read_the_history_and_turn_run_ahead_off():
    scheduler, builder = _scheduler(), _builder()
    scheduler.add(_group("a", 5, repetition_penalty=1.2))
    step = builder.build(scheduler.schedule(), None)
    assert step.reads_history and list(step.sampling[0].prompt_token_ids) == [1, 2, 3, 4, 5]


def test_prompt_logprobs_bring_each_computed_tokens_successor():
    scheduler, builder = _scheduler(), _builder()
    scheduler.add(_group("a", 5, prompt_logprobs=2))
    scheduler.add(_group("b", 2))
    step = builder.build(scheduler.schedule(), None)
    assert step.prompt_logprobs_k == 2
    assert [list(s) for s in step.successors] == [[2, 3, 4, 5, 0], [2, 0]]
