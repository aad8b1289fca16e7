"""The heap an engine starts with is frozen while the engine lives: full collections no longer walk it."""

import gc

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
