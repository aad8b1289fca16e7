"""AsyncLLMEngine: cumulative streams, concurrent requests, abort by leaving the stream, and a failing step that
fails every stream and marks the engine unhealthy instead of hanging."""

import asyncio
import re

import pytest

from conftest import FIXTURES, TINY, golden
from jaxllm import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    EngineStepError,
    SamplingParams,
    StructuredOutputsParams,
)
from waiting import async_wait_until, wait_until

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
G = golden("llama3")


def _config():
    return EngineConfig(model=str(FIXTURES / "llama3"), **TINY)


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLMEngine(_config())
    yield engine
    asyncio.run(engine.shutdown())


async def _collect(engine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id)]


def _wait_idle(engine, timeout=10.0):
    wait_until(lambda: not engine.engine.has_unfinished_requests(), timeout=timeout,
               message="the engine still has unfinished requests")


@pytest.mark.timeout(120)
def test_stream_is_cumulative_and_ends_finished(engine):
    outs = asyncio.run(_collect(engine, {"prompt_token_ids": G["prompt_2"].tolist()}, GREEDY, "stream"))
    assert len(outs) > 1, "the whole result came in one piece"
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    for before, after in zip(outs, outs[1:]):
        assert len(after.outputs[0].token_ids) > len(before.outputs[0].token_ids)
        assert after.outputs[0].token_ids[:len(before.outputs[0].token_ids)] == before.outputs[0].token_ids
        assert after.outputs[0].text.startswith(before.outputs[0].text)
    final = outs[-1].outputs[0]
    assert final.token_ids == G["greedy_2"].tolist() and final.finish_reason == "length"
    assert all(o.request_id == "stream" for o in outs)
    assert engine.is_healthy()


@pytest.mark.timeout(120)
def test_concurrent_streams_are_each_exact(engine):
    async def main():
        return await asyncio.gather(*[_collect(engine, {"prompt_token_ids": G[f"prompt_{i}"].tolist()}, GREEDY,
                                               f"c{i}") for i in range(3)])
    results = asyncio.run(main())
    for i, outs in enumerate(results):
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == G[f"greedy_{i}"].tolist()


@pytest.mark.timeout(120)
def test_leaving_the_stream_aborts_and_frees_blocks(engine):
    bm = engine.engine.block_manager
    start = bm.num_free_blocks
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def leave_early():
        seen = 0
        async for out in engine.generate({"prompt_token_ids": G["prompt_2"].tolist()}, long, "leaver"):
            seen += 1
            assert not out.finished
            if seen == 3:
                assert bm.num_free_blocks < start
                break
        # The abandoned generator is finalized by the loop, and its abort reaches the engine thread.
        await async_wait_until(lambda: engine.engine.scheduler.get_group("leaver") is None, timeout=10,
                               message="leaving the stream never aborted the request")

    async def cancelled():
        task = asyncio.create_task(_collect(engine, {"prompt_token_ids": G["prompt_1"].tolist()}, long, "cancelled"))
        await async_wait_until(lambda: engine.engine.scheduler.get_group("cancelled") is not None, timeout=30,
                               message="the request never reached the scheduler")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave_early())
    _wait_idle(engine)
    assert bm.num_free_blocks == start
    asyncio.run(cancelled())
    _wait_idle(engine)
    assert bm.num_free_blocks == start
    assert engine.stats().num_requests_running == 0 and engine.is_healthy()


@pytest.mark.timeout(120)
def test_abort_ends_a_stream_that_is_still_read(engine):
    bm = engine.engine.block_manager
    start = bm.num_free_blocks
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        outs = []
        async for out in engine.generate({"prompt_token_ids": G["prompt_2"].tolist()}, long, "aborted"):
            outs.append(out)
            if len(outs) == 3:
                await engine.abort("aborted")
        return outs
    outs = asyncio.run(main())
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert 3 <= len(final.outputs[0].token_ids) < 200
    assert final.outputs[0].token_ids[:32] == G["greedy_2"].tolist()[:len(final.outputs[0].token_ids)]
    _wait_idle(engine)
    assert bm.num_free_blocks == start


def test_bad_request_fails_alone(engine):
    async def main():
        with pytest.raises(ValueError, match="maximum context length"):
            await _collect(engine, {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=1000), "bad")
        return await _collect(engine, {"prompt_token_ids": G["prompt_0"].tolist()}, GREEDY, "good")
    outs = asyncio.run(main())
    assert outs[-1].outputs[0].token_ids == G["greedy_0"].tolist() and engine.is_healthy()


@pytest.mark.timeout(60)
def test_step_failure_fails_every_stream_and_marks_the_engine_dead():
    engine = AsyncLLMEngine(_config())
    assert engine.is_healthy()

    def broken(*args, **kwargs):
        raise RuntimeError("injected device failure")
    engine.engine.runner.dispatch = broken

    async def main():
        results = await asyncio.gather(
            *[_collect(engine, {"prompt_token_ids": G[f"prompt_{i}"].tolist()}, GREEDY, f"f{i}") for i in range(2)],
            return_exceptions=True)
        assert all(isinstance(r, EngineStepError) for r in results), results
        assert "RuntimeError" in str(results[0])
        with pytest.raises(EngineDeadError):
            await _collect(engine, {"prompt_token_ids": G["prompt_0"].tolist()}, GREEDY, "after")

    try:
        asyncio.run(main())
        assert not engine.is_healthy()
        assert not engine.engine.has_unfinished_requests()
        assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_usable_blocks
    finally:
        asyncio.run(engine.shutdown())


@pytest.mark.timeout(120)
def test_a_constrained_stream_follows_its_regex_beside_a_plain_one(engine):
    """The grammar compiles off the event loop; the constrained stream's text matches, the plain one is unchanged."""
    regex = "(ab|cd)[0-9]{2,4}x"
    constrained = SamplingParams(temperature=1.0, seed=3, max_tokens=16,
                                 structured_outputs=StructuredOutputsParams(regex=regex))
    prompt = {"prompt_token_ids": G["prompt_2"].tolist()}

    async def both():
        return await asyncio.gather(_collect(engine, prompt, constrained, "regex"),
                                    _collect(engine, prompt, GREEDY, "plain"))

    regex_outs, plain_outs = asyncio.run(both())
    assert re.fullmatch(regex, regex_outs[-1].outputs[0].text), regex_outs[-1].outputs[0].text
    assert plain_outs[-1].outputs[0].token_ids == G["greedy_2"].tolist()
