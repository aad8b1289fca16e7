"""The heap an engine starts with is frozen while the engine lives: full collections no longer walk it."""

import gc

import jax

from jaxllm import EngineConfig, LLMEngine, SamplingParams

FIXTURE = "tests/fixtures/llama3"


def test_the_start_up_heap_is_frozen_until_close():
    gc.unfreeze()  # whatever earlier tests left
    engine = LLMEngine(EngineConfig(model=FIXTURE, dtype="float32", enforce_eager=True, max_model_len=128,
                                    kv_cache_memory_bytes=1 << 22, max_num_seqs=4))
    try:
        frozen, walked = gc.get_freeze_count(), len(gc.get_objects())
        assert frozen > 10_000 and walked < frozen / 10, (frozen, walked)  # jax, the tokenizer, the model tables
        engine.add_request("r", {"prompt_token_ids": [5, 9, 13, 2]},
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        assert steps >= 2
    finally:
        engine.close()
    assert gc.get_freeze_count() == 0 and len(gc.get_objects()) > frozen  # back to the collector: no leak


def test_programs_traced_after_start_up_are_frozen_once_the_engine_is_idle():
    gc.unfreeze()
    engine = LLMEngine(EngineConfig(model=FIXTURE, dtype="float32", enforce_eager=True, max_model_len=128,
                                    kv_cache_memory_bytes=1 << 22, max_num_seqs=4))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        at_start = gc.get_freeze_count()
        engine.add_request("a", {"prompt_token_ids": [5, 9, 13, 2]}, params)
        engine.step()  # the prefill's program, traced now (enforce_eager), while the request is alive: not frozen
        assert gc.get_freeze_count() <= at_start
        while engine.has_unfinished_requests():
            engine.step()
        frozen = gc.get_freeze_count()
        # This engine's programs (its step is a method: traced anew per engine) and what JAX keeps of them.
        assert frozen > at_start + 500 and len(gc.get_objects()) < 200, (at_start, frozen)
        full_collections = []
        gc.callbacks.append(lambda phase, info: full_collections.append(phase) if info["generation"] == 2 else None)
        engine.add_request("b", {"prompt_token_ids": [7, 9, 11, 3]}, params)  # the same shapes: nothing new
        while engine.has_unfinished_requests():
            engine.step()
        gc.callbacks.pop()
        assert full_collections == []  # freezing again collects first: it did not
        engine.add_request("c", {"prompt_token_ids": list(range(3, 40))}, params)
        engine.step()
        engine.abort_request("c")  # idle through an abort, after a new (longer) prefill's program
        assert gc.get_freeze_count() > frozen and len(gc.get_objects()) < 200
    finally:
        engine.close()


def test_freeze_gc_and_compile_cache_off_leave_the_process_as_it_was():
    gc.unfreeze()
    cache_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        engine = LLMEngine(EngineConfig(model=FIXTURE, dtype="float32", enforce_eager=True, max_model_len=128,
                                        kv_cache_memory_bytes=1 << 22, max_num_seqs=4, freeze_gc=False,
                                        compile_cache=False))
        try:
            engine.add_request("r", {"prompt_token_ids": [5, 9, 13, 2]},
                               SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
            assert gc.get_freeze_count() == 0
            assert jax.config.jax_compilation_cache_dir is None
        finally:
            engine.close()
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
