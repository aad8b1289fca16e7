"""The step's input packing: buckets, the i32 layout of one step, and the single-transfer pytree packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kv_cache import NULL_BLOCK
from jaxllm.runtime import inputs, transfer
from jaxllm.runtime.buckets import BucketPlan


def test_bucket_sizes_double_and_grow_4x_below_coarse_below():
    fine = BucketPlan(max_num_seqs=48, max_num_batched_tokens=300, max_blocks=8)
    assert fine.decode_sizes == [1, 2, 4, 8, 16, 32, 48]
    assert fine.token_sizes == [16, 32, 64, 128, 256, 300]
    gpu = BucketPlan(max_num_seqs=256, max_num_batched_tokens=8192, max_blocks=8, coarse_below=64)
    assert gpu.decode_sizes == [1, 4, 16, 64, 128, 256]
    assert gpu.token_sizes == [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert BucketPlan(max_num_seqs=2, max_num_batched_tokens=8, max_blocks=8, coarse_below=64).token_sizes == [8]


@pytest.mark.parametrize("coarse_below", [0, 64])
def test_bucket_plan_covers_every_batch_with_the_smallest_layout(coarse_below):
    plan = BucketPlan(max_num_seqs=48, max_num_batched_tokens=300, max_blocks=8, coarse_below=coarse_below)
    rng = np.random.default_rng(0)
    for _ in range(200):
        seqs = int(rng.integers(1, 49))
        tokens = int(rng.integers(seqs, 301))
        layout = plan.pick(tokens, seqs, decode_only=False)
        assert layout in plan.layouts()
        assert layout.num_tokens >= tokens and layout.num_seqs >= seqs
        smaller = [t for t in plan.token_sizes if t < layout.num_tokens]
        assert not smaller or smaller[-1] < tokens
        decode = plan.pick(seqs, seqs, decode_only=True)
        assert decode in plan.layouts() and decode.num_tokens == decode.num_seqs >= seqs
        assert not [n for n in plan.decode_sizes if seqs <= n < decode.num_seqs]


def test_pack_lays_out_ragged_sequences_and_pads_to_the_null_block():
    block_size = 4
    work = [inputs.SeqWork(token_ids=[11, 12, 13], start_pos=5, block_table=[7, 3]),
            inputs.SeqWork(token_ids=[21], start_pos=0, block_table=[9])]
    plan = BucketPlan(max_num_seqs=4, max_num_batched_tokens=16, max_blocks=3)
    layout = plan.pick(4, 2, decode_only=False)
    buffer = jnp.asarray(inputs.pack(work, layout, block_size))
    token_ids, md, logits_indices = jax.jit(inputs.unpack, static_argnums=1)(buffer, layout)
    assert token_ids.tolist()[:4] == [11, 12, 13, 21]
    assert md.positions.tolist()[:4] == [5, 6, 7, 0]
    # position 5 -> block_table[1] = 3, offset 1; 6 -> 3*4+2; 7 -> 3*4+3; position 0 of seq 2 -> block 9.
    assert md.slot_mapping.tolist()[:4] == [13, 14, 15, 36]
    assert set(md.slot_mapping.tolist()[4:]) == {NULL_BLOCK * block_size}
    assert md.block_tables.tolist()[:2] == [[7, 3, 0], [9, 0, 0]]
    assert md.seq_lens.tolist() == [8, 1] + [0] * (layout.num_seqs - 2)
    assert md.query_start_loc.tolist() == [0, 3, 4] + [4] * (layout.num_seqs - 2)
    assert logits_indices.tolist()[:2] == [2, 3]


@pytest.mark.parametrize("seed", [0, 1])
def test_transfer_round_trips_every_leaf_dtype(seed):
    rng = np.random.default_rng(seed)
    tree = {"f": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.random(7) > 0.5,
            "u": rng.integers(0, 2**32, size=(2, 2), dtype=np.uint32), "i": rng.integers(-9, 9, size=4, dtype=np.int32),
            "nested": (rng.standard_normal(2).astype(np.float32),)}
    buffer, layout = transfer.pack(tree)
    out = jax.jit(transfer.unpack, static_argnums=(1,))(jnp.asarray(buffer), layout)
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)
