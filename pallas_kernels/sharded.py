"""The paged-attention entries (rotary + KV write, attention) and the quantized matmul under tensor parallelism:
each device of the mesh's "tp" axis runs the unsharded entry on its own slice of heads (attention never mixes
heads, so no collective is needed) or of the packed weight (quant_matmul_sharded: column- or row-parallel).

Legend: T tokens, S sequences, N q-heads, K kv-heads, H head_dim, P pages, B tokens per page, M pages per sequence.
Layouts: q [T, N, H] and the output split over N; pages [K, P, B, H] split over K; the fused q/k/v projection
[T, S, W] split over its S blocks (one per device: its q-heads, then its kv-heads' k and v); cos/sin and the
metadata (block tables, lengths, query starts, slots) replicated. The q-heads of kv-head k are k*G .. k*G + G - 1,
so splitting N and K into the same number of contiguous parts keeps every group on the device of its kv-head.
The arrays must already carry these shardings (jax.device_put with a NamedSharding of the mesh, or the outputs of
a step sharded the same way): with Explicit mesh axes, shard_map does not reshard its inputs.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.quant_pack import values_per_word
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.rotary_kv import rotary_write_kv


def _check_heads(mesh: Mesh, axis: str, num_kv_heads: int) -> None:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    if num_kv_heads % mesh.shape[axis]:
        raise ValueError(f"kv heads ({num_kv_heads}) must be a multiple of the {axis!r} axis size "
                         f"({mesh.shape[axis]})")


def ragged_paged_attention_sharded(
    q: jax.Array,  # [T, N, H], N split over axis
    k_pages: jax.Array,  # [K, P, B, H], K split over axis
    v_pages: jax.Array,  # [K, P, B, H], K split over axis
    block_tables: jax.Array,  # i32[S, M]
    seq_lens: jax.Array,  # i32[S]
    query_start_loc: jax.Array,  # i32[S + 1]
    *,
    mesh: Mesh,
    axis: str = "tp",
    **knobs,
) -> jax.Array:  # [T, N, H], N split over axis
    """ragged_paged_attention (same keyword knobs) with the heads split over mesh axis `axis`."""
    _check_heads(mesh, axis, k_pages.shape[0])
    heads, pages, replicated = P(None, axis, None), P(axis, None, None, None), P()
    return jax.shard_map(
        functools.partial(ragged_paged_attention, **knobs), mesh=mesh,
        in_specs=(heads, pages, pages, replicated, replicated, replicated), out_specs=heads,
        check_vma=False,  # a pallas_call carries no varying-axis annotation
    )(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc)


def rotary_write_kv_sharded(
    qkv: jax.Array,  # [T, S, W], S (one fused q/k/v block per device) split over axis
    cos: jax.Array,  # [T, R]
    sin: jax.Array,  # [T, R]
    k_pages: jax.Array,  # [K, P, B, H], K split over axis
    v_pages: jax.Array,  # [K, P, B, H], K split over axis
    slot_mapping: jax.Array,  # i32[T]
    *,
    num_q_heads: int,
    mesh: Mesh,
    axis: str = "tp",
    **knobs,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # q [T, N, H] with N split over axis, k_pages', v_pages'
    """rotary_write_kv (same keyword knobs) on each device's block of the fused projection: its q-heads and the
    kv-heads of its cache slots. In place when the caller donates the pages."""
    _check_heads(mesh, axis, k_pages.shape[0])
    shards = mesh.shape[axis]
    if qkv.shape[1] != shards:
        raise ValueError(f"qkv has {qkv.shape[1]} fused blocks; the {axis!r} axis has {shards} devices")

    def local(qkv, cos, sin, k_pages, v_pages, slot_mapping):
        return rotary_write_kv(qkv.reshape(qkv.shape[0], -1), cos, sin, k_pages, v_pages, slot_mapping,
                               num_q_heads=num_q_heads // shards, **knobs)

    heads, pages, replicated = P(None, axis, None), P(axis, None, None, None), P()
    return jax.shard_map(
        local, mesh=mesh, in_specs=(heads, replicated, replicated, pages, pages, replicated),
        out_specs=(heads, pages, pages), check_vma=False,  # a pallas_call carries no varying-axis annotation
    )(qkv, cos, sin, k_pages, v_pages, slot_mapping)


def quant_matmul_sharded(
    x: jax.Array,  # [M, K]: replicated (column) or K split over axis (row)
    qweight: jax.Array,  # i32[K / E, N]: N split (column) or K / E split (row)
    scales: jax.Array,  # [K / G, N]: split as qweight (replicated when row-parallel with one group)
    zeros: jax.Array,  # [K / G, N]: as scales
    *,
    bits: int,
    mesh: Mesh,
    axis: str = "tp",
    parallel: str,
    **knobs,
) -> jax.Array:  # [M, N]: N split over axis (column), replicated (row)
    """quant_matmul (same keyword knobs) with the packed weight split over mesh axis `axis` as its dense twin:
    "column" splits N (each device computes its outputs), "row" splits K in whole groups (each device its partial
    sum of all outputs, psum'd; per-channel scales and zeros, one group, are replicated instead). The inputs must
    already carry these shardings (see the module docstring)."""
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    shards = mesh.shape[axis]
    words, n = qweight.shape
    k = words * values_per_word(bits)
    groups = scales.shape[0]
    if parallel == "column":
        if n % shards:
            raise ValueError(f"{n} output columns of qweight {qweight.shape} (scales {scales.shape}) do not split "
                             f"over the {shards} devices of {axis!r}")
        operand, weight, out = P(), P(None, axis), P(None, axis)
        group_spec = weight
    elif parallel == "row":
        # One group (per-channel) covers every shard's slice of K: its scales and zeros are replicated.
        if words % shards or (groups > 1 and groups % shards):
            raise ValueError(f"K = {k} of qweight {qweight.shape} (scales {scales.shape}: {groups} groups) does not "
                             f"split over the {shards} devices of {axis!r} in whole words and whole groups")
        operand, weight, out = P(None, axis), P(axis, None), P()
        group_spec = P() if groups == 1 else weight
    else:
        raise ValueError(f"parallel must be 'column' or 'row'; got {parallel!r}")

    def local(x, qweight, scales, zeros):
        y = quant_matmul(x, qweight, scales, zeros, bits=bits, **knobs)
        if parallel == "column":
            return y
        # Each shard's partial output is already rounded to x's dtype; the shards add in float32.
        return jax.lax.psum(y.astype(jnp.float32), axis).astype(y.dtype)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(operand, weight, group_spec, group_spec), out_specs=out,
        check_vma=False,  # a pallas_call carries no varying-axis annotation
    )(x, qweight, scales, zeros)
