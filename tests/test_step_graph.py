"""The GPU step has no host-driven loops: XLA runs a `while` (or a scan lowered to one) outside the step's CUDA
graph, one host round trip per iteration, so the host waits for the device mid-step and run-ahead stops overlapping.
Also the query-block map and token positions those loops used to compute, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from jaxllm import EngineConfig, LLMEngine
from jaxllm.runtime import inputs
from pallas_kernels.positions import token_positions
from pallas_kernels.ragged_attention_kernel import query_blocks

LOOP = "loop"


def _primitives_outside_kernels(jaxpr) -> list[str]:
    """Every primitive of a jaxpr and its sub-jaxprs, not looking inside Pallas kernels (their loops are GPU code);
    a `while`, or a scan that is not fully unrolled (it lowers to one), is reported as LOOP."""
    names = []
    for eqn in jaxpr.eqns:
        params = eqn.params
        unrolled = eqn.primitive.name == "scan" and (params["unroll"] is True or params["unroll"] >= params["length"])
        names.append(LOOP if eqn.primitive.name in ("while", "scan") and not unrolled else eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            continue
        for sub in jaxprs_in_params(eqn.params):
            names += _primitives_outside_kernels(sub)
    return names


def test_the_gpu_step_has_no_host_driven_loops():
    engine = LLMEngine(EngineConfig(model="tests/fixtures/llama3", dtype="float32", enforce_eager=True,
                                    kernel_backend="triton", max_model_len=64, kv_cache_memory_bytes=1 << 21,
                                    max_num_seqs=4, max_num_batched_tokens=32, skip_tokenizer_init=True))
    try:
        runner = engine.runner
        layouts = runner.buckets.layouts()
        assert {layout.decode_only for layout in layouts} == {True, False}
        for layout in layouts:
            buffer = inputs.abstract_buffer(layout, runner._replicated)
            closed = jax.make_jaxpr(runner._step_fn, static_argnums=(5,))(
                runner.params, runner.kv_cache, buffer, runner._last_tokens, runner._logits_out(layout), layout)
            names = _primitives_outside_kernels(closed.jaxpr)
            assert "pallas_call" in names, (layout, "the Triton kernels were not traced: the check would be vacuous")
            assert LOOP not in names, layout
    finally:
        engine.close()


def _ragged(rng, num_seqs: int, num_tokens: int) -> np.ndarray:
    lengths = rng.integers(0, 3, num_seqs) * rng.integers(1, 9, num_seqs)  # some empty, some long
    while lengths.sum() > num_tokens:
        lengths[rng.integers(num_seqs)] //= 2
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


@pytest.mark.parametrize("num_seqs,num_tokens,block_q", [(1, 16, 4), (3, 32, 2), (8, 64, 8), (5, 40, 1)])
def test_query_blocks_match_a_numpy_walk(num_seqs, num_tokens, block_q):
    rng = np.random.default_rng(num_seqs * 100 + block_q)
    for _ in range(5):
        qsl = _ragged(rng, num_seqs, num_tokens)
        num_blocks = max(1, min(-(-num_tokens // block_q) + num_seqs + 1, num_tokens))
        # Numpy: blocks in sequence order, ceil(len / Q) each, listed heaviest (last) first.
        seqs, toks = [], []
        for s in range(num_seqs):
            for b in range(-(-(qsl[s + 1] - qsl[s]) // block_q)):
                seqs.append(s)
                toks.append(qsl[s] + b * block_q)
        tail = num_blocks - len(seqs)
        seqs += [num_seqs] * tail
        toks += [qsl[-1] + i * block_q for i in range(tail)]
        blk_seq, blk_tok = query_blocks(jnp.asarray(qsl), num_blocks, block_q)
        np.testing.assert_array_equal(np.asarray(blk_seq), np.array(seqs[::-1]))
        np.testing.assert_array_equal(np.asarray(blk_tok), np.array(toks[::-1]))


def test_token_positions_match_a_numpy_walk():
    rng = np.random.default_rng(7)
    for num_seqs, num_tokens in [(1, 8), (4, 32), (9, 64)]:
        qsl = _ragged(rng, num_seqs, num_tokens)
        q_lens = np.diff(qsl)
        seq_lens = q_lens + rng.integers(0, 50, num_seqs)
        seq, pos, real = (np.asarray(a) for a in token_positions(jnp.asarray(seq_lens, jnp.int32),
                                                                 jnp.asarray(qsl), num_tokens))
        for t in range(num_tokens):
            if t < qsl[-1]:
                s = int(np.searchsorted(qsl[1:], t, side="right"))
                assert (seq[t], pos[t], real[t]) == (s, seq_lens[s] - q_lens[s] + t - qsl[s], True)
            else:
                assert (seq[t], real[t]) == (num_seqs - 1, False)
