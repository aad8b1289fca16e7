"""Rotary position embedding of the new queries and keys, and the write of the new keys and values into the paged
KV cache, in one Pallas (Triton lowering) kernel.

Legend: T tokens, N q-heads, K kv-heads, H head_dim, R = H // 2 rotary frequencies, P pages, B tokens per page,
W = (N + 2K) * H the width of one token's fused q/k/v projection (q heads, then k heads, then v heads).

After the fused q/k/v projection, XLA:GPU runs a layer's rotary as three kernels and the two cache writes as two
more, each launch-bound at batch 1 (docs/perf-notes.md#rotary-and-kv-write-in-one-kernel). Here one program
per token and part reads its share of the token's projection row once: the q heads, rotated, into q; the k heads,
rotated, and the v heads into the cache slot `slot_mapping[t]`. The pages are updated in place (aliased in and out).

Numerics: the rotation is computed in float32 from the rounded cos/sin and rounded once to the output dtype. XLA's
bf16 expression rounds differently: on an H200 68% of the rotated q elements are bit-equal to it and the rest one
bf16 rounding apart (benchmarks/kernels_check.py); in float32 the two agree exactly.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import attention_tile as tile


def _rotate(x_ref, cos_ref, sin_ref, t, heads: jax.Array, last_head: int):
    """Rows `heads` (clamped to last_head) of token t's projection, rotated: (first halves, second halves), each
    [Np, Rp] in float32."""
    half = cos_ref.shape[1]
    cos = tile.gather_rows(cos_ref, (t,), half).astype(jnp.float32)  # [1, Rp]
    sin = tile.gather_rows(sin_ref, (t,), half).astype(jnp.float32)
    rows = (t, jnp.minimum(heads, last_head))
    x1 = tile.gather_rows(x_ref, rows, half).astype(jnp.float32)
    x2 = tile.gather_rows(x_ref, rows, half, first_column=half).astype(jnp.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _kernel(slot_ref, qkv_ref, cos_ref, sin_ref, _k_in, _v_in, q_ref, k_ref, v_ref, *, num_q_heads: int,
            num_kv_heads: int):
    """Program (t, part): token t's q heads (part 0), k heads (1) or v heads (2), so that a batch-1 step's three
    short chains of loads and stores run side by side."""
    # qkv_ref [T, N + 2K, H]; cos_ref, sin_ref [T, R]; q_ref [T, N, H]; k_ref, v_ref [K, P * B, H] (the pages)
    t, part = pl.program_id(0), pl.program_id(1)
    half = cos_ref.shape[1]
    kv_heads = jnp.arange(pl.next_power_of_2(num_kv_heads), dtype=jnp.int32)
    kv_ok = kv_heads < num_kv_heads

    @pl.when(part == 0)
    def _():
        heads = jnp.arange(pl.next_power_of_2(num_q_heads), dtype=jnp.int32)
        q1, q2 = _rotate(qkv_ref, cos_ref, sin_ref, t, heads, num_q_heads - 1)
        tile.scatter_rows(q_ref, (t, heads), q1, heads < num_q_heads, half)
        tile.scatter_rows(q_ref, (t, heads), q2, heads < num_q_heads, half, first_column=half)

    @pl.when(part == 1)
    def _():
        k1, k2 = _rotate(qkv_ref, cos_ref, sin_ref, t, num_q_heads + kv_heads, num_q_heads + num_kv_heads - 1)
        tile.scatter_rows(k_ref, (kv_heads, slot_ref[t]), k1, kv_ok, half)
        tile.scatter_rows(k_ref, (kv_heads, slot_ref[t]), k2, kv_ok, half, first_column=half)

    @pl.when(part == 2)
    def _():
        rows = jnp.minimum(num_q_heads + num_kv_heads + kv_heads, num_q_heads + 2 * num_kv_heads - 1)
        v = tile.gather_rows(qkv_ref, (t, rows), 2 * half)
        tile.scatter_rows(v_ref, (kv_heads, slot_ref[t]), v, kv_ok, 2 * half)


def rotary_write_kv_triton(qkv, cos, sin, k_pages, v_pages, slot_mapping, *, num_q_heads: int,
                            interpret: bool = False):
    num_tokens = qkv.shape[0]
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    flat = (num_kv_heads, num_pages * page_size, head_dim)
    q, k_flat, v_flat = pl.pallas_call(
        functools.partial(_kernel, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads),
        grid=(num_tokens, 3),
        out_shape=(jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), qkv.dtype),
                   jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype)),
        input_output_aliases={4: 1, 5: 2},
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
        name="rotary_write_kv",
    )(slot_mapping, qkv.reshape(num_tokens, -1, head_dim), cos, sin, k_pages.reshape(flat), v_pages.reshape(flat))
    return q, k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)
