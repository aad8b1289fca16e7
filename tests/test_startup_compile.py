"""Start-up compiles every bucket, and those programs are the ones the steps run: no step compiles again, nor the
copy that stages a step's inputs."""

import collections
import dataclasses
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import EngineConfig, LLMEngine, SamplingParams, sharding
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.model_config import ModelConfig
from jaxllm.models.registry import build_model
from jaxllm.models.state import ModuleLayout


def test_steps_run_the_programs_compiled_at_start_up(caplog):
    phases = []
    engine = LLMEngine(EngineConfig(model="tests/fixtures/llama3", dtype="float32", enforce_eager=False,
                                    max_model_len=64, kv_cache_memory_bytes=1 << 21, max_num_seqs=2,
                                    max_num_batched_tokens=16),
                       progress=lambda phase, done, total: phases.append((phase, done, total)))
    try:
        layouts = engine.runner.buckets.layouts()
        assert ("compiling buckets", len(layouts), len(layouts)) in phases
        rng = np.random.default_rng(0)
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            for i, length in enumerate((3, 13)):  # a short and a chunked prompt: mixed and decode buckets
                engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(5, 500, length).tolist()},
                                   SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
            finished = []
            while engine.has_unfinished_requests():
                finished += [o for o in engine.step() if o.finished]
        assert sorted(len(o.outputs[0].token_ids) for o in finished) == [5, 5]
        compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
        assert compiles, "jax.log_compiles logged nothing: the check below would pass vacuously"
        # Neither the step nor the copy into a bucket's staged inputs (made on a bucket's second step) compiles.
        assert not [m for m in compiles if "_step_fn" in m or "_copy_into" in m], [m[:120] for m in compiles]
    finally:
        engine.close()


def test_eager_engine_makes_one_program_per_bucket():
    """Without start-up compiles a bucket's program is made at its first step, and its later steps reuse it: the
    step's outputs keep the shardings its inputs had. (The logits buffer came back as P("tp", None) once; the next
    step, given it, missed jit's C++ cache and took the Python path, which on an H200 lowered the step again and
    built it a new CUDA graph: ~6 ms. jit's cache size is the direct witness: one entry per argument signature.)"""
    engine = LLMEngine(EngineConfig(model="tests/fixtures/llama3", dtype="float32", enforce_eager=True,
                                    max_model_len=64, kv_cache_memory_bytes=1 << 21, max_num_seqs=2,
                                    max_num_batched_tokens=16))
    try:
        rng = np.random.default_rng(1)
        for i in range(3):  # the same prefill bucket three times, a decode bucket after each
            engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(5, 500, 13).tolist()},
                               SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
        buckets = engine.runner.num_layouts_run
        assert buckets == 2 and engine.runner._step._cache_size() == buckets
    finally:
        engine.close()


def test_a_step_lowers_its_decoder_layer_once():
    """The decoder layers, alike in shapes, are one function of the lowered step, called once per layer, so a bucket
    traces and lowers one layer (its kernels included) rather than every layer. The last layer is a second one:
    the residual stream it returns is unused, and JAX prunes that output from its copy."""
    config = dataclasses.replace(ModelConfig.from_pretrained("tests/fixtures/llama3"), num_layers=6)
    layout, params = ModuleLayout.split(build_model(config, mesh=sharding.make_mesh(1)))  # abstract: shapes only
    pages = jax.ShapeDtypeStruct((config.num_kv_heads, 8, 16, config.head_dim), jnp.float32)
    kv_cache = KVCache(k=(pages,) * config.num_layers, v=(pages,) * config.num_layers)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    metadata = AttentionMetadata(positions=i32((4,)), slot_mapping=i32((4,)), block_tables=i32((2, 4)),
                                 seq_lens=i32((2,)), query_start_loc=i32((3,)))
    step = jax.jit(lambda params, *args: layout.merge(params).step(*args))
    text = step.lower(params, kv_cache, i32((4,)), metadata).as_text()
    calls = collections.Counter(re.findall(r"call @(_decoder_layer\w*)\(", text))
    assert sorted(calls.values()) == [1, config.num_layers - 1], calls
    assert len(re.findall(r"func\.func private @_decoder_layer\w*\(", text)) == 2
