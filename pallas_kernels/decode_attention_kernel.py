"""Pallas (Triton lowering) paged decode attention with flash-decoding: one new token per sequence.

Legend: T tokens, S sequences, N q-heads, K kv-heads, G = N // K, Gp = max(16, G rounded up to a power of 2),
H head_dim, P pages, B tokens per page, M pages per sequence, C context positions of a tile, X context splits.

The grid is (S, K, X): a program reads one kv-head's context of one sequence once for all its G q-heads (GQA),
and a sequence's context is cut into X even parts (Dao et al., "Flash-Decoding", 2023) so that a batch of 1 at
32k context still puts hundreds of programs on the GPU. Each split leaves an unnormalised partial output with
its max and sum; a second small kernel merges them. With X = 1 the kernel normalises and writes the output itself.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import attention_tile as tile


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tuning of the decode kernel. The defaults were the fastest of a sweep at batch 64 x 4k, bf16, d = 128; the
    read ceiling decides, not the tuning (docs/perf-notes.md#decode-and-prefill-kernel-tuning).

    num_splits=None picks X so that S * K * X reaches about target_programs (one split once the batch alone does;
    a merge is a kernel of its own), with at least min_split_tokens context positions per split.
    """

    block_k: int = 64  # C
    num_splits: int | None = None
    target_programs: int = 512
    min_split_tokens: int = 256
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"DecodeConfig.block_k must be a power of 2 >= 16; got {self.block_k}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeConfig.num_splits must be >= 1 or None; got {self.num_splits}")
        if self.target_programs < 1 or self.min_split_tokens < 1:
            raise ValueError("DecodeConfig.target_programs and min_split_tokens must be >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"DecodeConfig.num_warps must be a power of 2 <= 16; got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"DecodeConfig.num_stages must be >= 1; got {self.num_stages}")

    def splits(self, num_seqs: int, num_kv_heads: int, context: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        wanted = pl.cdiv(self.target_programs, num_seqs * num_kv_heads)
        return max(1, min(wanted, context // self.min_split_tokens))


def _decode_kernel(
    qsl_ref,  # i32[S + 1]
    seq_lens_ref,  # i32[S]
    bt_ref,  # i32[S, M]
    q_ref,  # [T, N, H]
    k_ref,  # [K, P * B, H]
    v_ref,  # [K, P * B, H]
    *out_refs,  # X == 1: o [T, N, H]. X > 1: o f32[X, S, N, H], m f32[X, S, N], l f32[X, S, N]
    group: int,
    block_k: int,
    page_size: int,
    head_dim: int,
    num_splits: int,
    tile_math: tile.TileMath,
):
    num_tokens, num_q_heads, _ = q_ref.shape
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tok = qsl_ref[seq]
    has_token = qsl_ref[seq + 1] > tok  # padding sequences bring none
    ctx_len = jnp.where(has_token, seq_lens_ref[seq], 0)

    g = jnp.arange(max(16, pl.next_power_of_2(group)), dtype=jnp.int32)  # dot tiles need >= 16 rows
    head = kv_head * group + g
    q = tile.gather_rows(q_ref, (jnp.minimum(tok, num_tokens - 1), jnp.minimum(head, num_q_heads - 1)), head_dim)
    q = tile_math.prepare_q(q)

    lo = 0 if tile_math.sliding_window is None else jnp.maximum(ctx_len - tile_math.sliding_window, 0)
    first_tile = lax.div(lo, block_k)
    tiles = pl.cdiv(ctx_len, block_k) - first_tile
    per_split = pl.cdiv(tiles, num_splits)
    start = jnp.minimum(first_tile + split * per_split, first_tile + tiles)
    stop = jnp.minimum(start + per_split, first_tile + tiles)
    # Only the window's first tile and the context's last one are partly visible.
    full_start = tile.clamp(pl.cdiv(lo, block_k), start, stop)
    full_end = tile.clamp(lax.div(ctx_len, block_k), full_start, stop)

    def body(t, carry, masked):
        pos = t * block_k + jnp.arange(block_k, dtype=jnp.int32)
        slots = tile.kv_slots(bt_ref, seq, pos, page_size=page_size)
        in_context = ((pos >= lo) & (pos < ctx_len)) if masked else None  # edge tiles read only their keys
        k = tile.gather_rows(k_ref, (kv_head, slots), head_dim, row_ok=in_context)
        v = tile.gather_rows(v_ref, (kv_head, slots), head_dim, row_ok=in_context)
        visible = None if in_context is None else jnp.broadcast_to(in_context[None, :], (g.shape[0], block_k))
        return tile.flash_update(carry, q, k, v, visible, tile_math)

    carry = tile.init_carry(g.shape[0], q.shape[-1])
    acc, m, l = tile.sweep_tiles((start, full_start, full_end, stop), body, carry)
    if num_splits == 1:
        # T == S: real sequences write their token's row, padding ones a zero row past the real tokens.
        row = jnp.where(has_token, tok, qsl_ref[qsl_ref.shape[0] - 1] + seq - tok)
        out = jnp.where(has_token, acc / l[:, None], 0.0)
        (o_ref,) = out_refs
        tile.scatter_rows(o_ref, (row, head), out, g < group, head_dim)
    else:
        o_ref, m_ref, l_ref = out_refs
        tile.scatter_rows(o_ref, (split, seq, head), acc, g < group, head_dim)
        plgpu.store(m_ref.at[split, seq, head], m, mask=g < group)
        plgpu.store(l_ref.at[split, seq, head], l, mask=g < group)


def decode_attention_triton(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, B, H]
    v_pages: jax.Array,  # [K, P, B, H]
    block_tables: jax.Array,  # i32[S, M]
    seq_lens: jax.Array,  # i32[S]
    query_start_loc: jax.Array,  # i32[S + 1]
    *,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    config: DecodeConfig,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """Each sequence's one token (query_start_loc[s]) attends to its context; padding rows of the output are 0.

    Needs T == S (AttentionMetadata.decode_only) with the padding sequences (no token) after the real ones (one
    token each), as the runner lays a decode step out: sequence s's token is row s.
    """
    _, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_seqs, pages_per_seq = block_tables.shape
    assert q.shape[0] == num_seqs, "decode needs one token per sequence (T == S)"
    context = pages_per_seq * page_size
    if sliding_window is not None:
        context = min(context, sliding_window + config.block_k)
    num_splits = config.splits(num_seqs, num_kv_heads, context)
    group = num_q_heads // num_kv_heads
    block_k, num_stages = tile.fit_shared_memory(config.block_k, config.num_stages,
                                                 max(16, pl.next_power_of_2(group)), head_dim, q.dtype.itemsize)

    kernel = functools.partial(
        _decode_kernel, group=group, block_k=block_k, page_size=page_size,
        head_dim=head_dim, num_splits=num_splits, tile_math=tile.TileMath(scale, soft_cap, sliding_window))
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((num_splits, num_seqs, num_q_heads, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, num_seqs, num_q_heads), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, num_seqs, num_q_heads), jnp.float32))
    flat = (num_kv_heads, num_pages * page_size, head_dim)
    out = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(query_start_loc, seq_lens, block_tables, q, k_pages.reshape(flat), v_pages.reshape(flat))
    if num_splits == 1:
        return out
    return _merge_splits(*out, dtype=q.dtype, interpret=interpret)  # row s is sequence s's


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, num_splits: int, head_dim: int):
    """Program (s, n): the X partial softmaxes of sequence s's q-head n -> its output row, in the output dtype."""
    # o_ref f32[X, S, N, H]; m_ref, l_ref f32[X, S, N] (base 2, unnormalised); out_ref [S, N, H]
    seq, head = pl.program_id(0), pl.program_id(1)
    split = jnp.arange(pl.next_power_of_2(num_splits), dtype=jnp.int32)
    real = split < num_splits
    split = jnp.minimum(split, num_splits - 1)
    m = jnp.where(real, m_ref[split, seq, head], jnp.finfo(jnp.float32).min)  # [Xp]
    weight = jnp.where(real, jnp.exp2(m - m.max()), 0.0)
    total = jnp.sum(jnp.where(real, l_ref[split, seq, head], 0.0) * weight)
    o = tile.gather_rows(o_ref, (split, seq, head), head_dim)  # [Xp, Hp]
    out = jnp.sum(o * weight[:, None], axis=0) / jnp.maximum(total, 1e-30)  # a padding sequence: 0 / tiny = 0
    tile.scatter_rows(out_ref, (seq, head), out[None, :], jnp.ones((1,), jnp.bool_), head_dim)


def _merge_splits(o, m, l, *, dtype, interpret: bool):  # f32[X, S, N, H], f32[X, S, N] x 2 -> [S, N, H]
    """Merge each (sequence, head)'s X partial softmaxes in one small kernel that also writes the output dtype
    (XLA took two kernels, a reduction over X and a convert: docs/perf-notes.md#split-decode-merge-kernel)."""
    num_splits, num_seqs, num_q_heads, head_dim = o.shape
    return pl.pallas_call(
        functools.partial(_merge_kernel, num_splits=num_splits, head_dim=head_dim),
        grid=(num_seqs, num_q_heads),
        out_shape=jax.ShapeDtypeStruct((num_seqs, num_q_heads, head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=2),
        interpret=interpret,
        name="merge_decode_splits",
    )(o, m, l)
