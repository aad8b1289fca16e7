"""Pallas (Triton lowering) ragged paged attention: one launch for a batch mixing prefill chunks and decodes.

Legend: T tokens, S sequences, N q-heads, K kv-heads, G = N // K, Gp = G rounded up to a power of 2, H head_dim,
P pages, B tokens per page, M pages per sequence, Q tokens of a query block, R = Q * Gp rows of a program,
C context positions of a tile, NB query blocks.

Each program takes Q consecutive new tokens of one sequence and all G q-heads of one kv-head as R rows, so every
K/V tile it gathers serves G heads at once (GQA read once; vLLM's unified Triton attention does the same). The
grid is (NB, K), NB a static bound on the query blocks; each sequence's tokens start a fresh block, blocks after
the real ones write zeros over the padding tokens, and the rest return at once. Only tiles that straddle the causal
diagonal, the window's edge or the context's end pay for a mask.
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
class RaggedConfig:
    """Tuning of the mixed prefill/decode kernel. The defaults were the fastest of a sweep at 4k causal prefill,
    bf16, d = 128 (docs/perf-notes.md#decode-and-prefill-kernel-tuning); fit_shared_memory shrinks them for
    fp32/d = 256."""

    block_rows: int = 128  # R: query tokens x q-heads per program
    block_k: int = 128  # C: context positions per tile
    num_warps: int = 8
    num_stages: int = 3
    half_exp: bool = False  # bf16/fp16 exp2 in pairs (sm_90); the CPU interpreter always uses f32 exp2

    def __post_init__(self):
        for name in ("block_rows", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"RaggedConfig.{name} must be a power of 2 >= 16; got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"RaggedConfig.num_warps must be a power of 2 <= 16; got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"RaggedConfig.num_stages must be >= 1; got {self.num_stages}")


def _ragged_kernel(
    blk_seq_ref,  # i32[NB]   sequence of each query block; S marks a block past the real ones
    blk_tok_ref,  # i32[NB]   first token of each query block
    qsl_ref,  # i32[S + 1]
    seq_lens_ref,  # i32[S]
    bt_ref,  # i32[S, M]
    q_ref,  # [T, N, H]
    k_ref,  # [K, P * B, H]
    v_ref,  # [K, P * B, H]
    o_ref,  # [T, N, H]
    *,
    group: int,
    block_q: int,
    block_k: int,
    page_size: int,
    head_dim: int,
    tile_math: tile.TileMath,
):
    num_tokens, num_q_heads, _ = q_ref.shape
    num_seqs = seq_lens_ref.shape[0]
    group_p = pl.next_power_of_2(group)
    block = pl.program_id(0)
    kv_head = pl.program_id(1)
    seq = blk_seq_ref[block]
    tok0 = blk_tok_ref[block]
    row = jnp.arange(block_q * group_p, dtype=jnp.int32)
    tok = tok0 + lax.div(row, group_p)
    g = lax.rem(row, group_p)
    head = kv_head * group + g

    @pl.when((seq == num_seqs) & (tok0 < num_tokens))
    def _():
        # Padding tokens get 0, not stale memory: their K/V land in the null block, which real sequences read
        # under masked scores, and a NaN there would still poison p.v (0 * NaN).
        out = jnp.zeros((row.shape[0], pl.next_power_of_2(head_dim)), jnp.float32)
        tile.scatter_rows(o_ref, (tok, head), out, (tok < num_tokens) & (g < group), head_dim)

    @pl.when(seq < num_seqs)
    def _():
        q_start = qsl_ref[seq]
        q_end = qsl_ref[seq + 1]
        ctx_len = seq_lens_ref[seq]
        first_pos = ctx_len - (q_end - q_start)  # position of the sequence's first new token
        row_ok = (tok < q_end) & (g < group)
        q_pos = first_pos + (tok - q_start)  # i32[R]

        # Rows past the block's tokens or the group read a clamped row; they are never stored.
        q = tile.gather_rows(q_ref, (jnp.minimum(tok, num_tokens - 1), jnp.minimum(head, num_q_heads - 1)),
                             head_dim)
        q = tile_math.prepare_q(q)
        window = tile_math.sliding_window
        pos_lo = first_pos + (tok0 - q_start)  # the block's first and last query positions
        pos_hi = jnp.minimum(pos_lo + block_q, ctx_len) - 1
        lo = 0 if window is None else jnp.maximum(pos_lo - window + 1, 0)
        first_tile, end_tile = lax.div(lo, block_k), pl.cdiv(pos_hi + 1, block_k)
        # Tiles every row sees whole: keys <= pos_lo (causal) and, with a window, keys > pos_hi - window.
        full_end = tile.clamp(lax.div(pos_lo + 1, block_k), first_tile, end_tile)
        full_start = first_tile if window is None else tile.clamp(
            pl.cdiv(pos_hi - window + 1, block_k), first_tile, full_end)

        def body(t, carry, masked):
            pos = t * block_k + jnp.arange(block_k, dtype=jnp.int32)
            slots = tile.kv_slots(bt_ref, seq, pos, page_size=page_size)
            seen = ((pos >= lo) & (pos <= pos_hi)) if masked else None  # keys some row of the block sees
            k = tile.gather_rows(k_ref, (kv_head, slots), head_dim, row_ok=seen)
            v = tile.gather_rows(v_ref, (kv_head, slots), head_dim, row_ok=seen)
            visible = None
            if masked:
                visible = pos[None, :] <= q_pos[:, None]
                if window is not None:
                    visible &= pos[None, :] > q_pos[:, None] - window
            return tile.flash_update(carry, q, k, v, visible, tile_math)

        carry = tile.init_carry(block_q * group_p, q.shape[-1])
        acc, _, l = tile.sweep_tiles((first_tile, full_start, full_end, end_tile), body, carry)
        tile.scatter_rows(o_ref, (tok, head), acc / l[:, None], row_ok, head_dim)


def ragged_attention_triton(
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
    config: RaggedConfig,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    num_seqs = block_tables.shape[0]
    group = num_q_heads // num_kv_heads
    block_q = max(1, config.block_rows // pl.next_power_of_2(group))

    # Query blocks: each sequence's tokens split into ceil(q_len / Q) blocks, then ceil(pad / Q) blocks that zero
    # the padding tokens. Their sum is <= T / Q + S + 1 and <= T, a static bound NB; the blocks past them carry
    # the sentinel sequence S and a first token >= T, and return at once.
    num_blocks = max(1, min(pl.cdiv(num_tokens, block_q) + num_seqs + 1, num_tokens))
    blk_seq, blk_tok = query_blocks(query_start_loc, num_blocks, block_q)

    block_k, num_stages = tile.fit_shared_memory(config.block_k, config.num_stages, config.block_rows, head_dim,
                                                 q.dtype.itemsize)
    tile_math = tile.TileMath(scale, soft_cap, sliding_window, half_exp=config.half_exp and not interpret)
    kernel = functools.partial(_ragged_kernel, group=group, block_q=block_q, block_k=block_k, page_size=page_size,
                               head_dim=head_dim, tile_math=tile_math)
    flat = (num_kv_heads, num_pages * page_size, head_dim)
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(blk_seq, blk_tok, query_start_loc, seq_lens, block_tables, q, k_pages.reshape(flat), v_pages.reshape(flat))


def query_blocks(query_start_loc: jax.Array, num_blocks: int, block_q: int) -> tuple[jax.Array, jax.Array]:
    """Each of the NB query blocks' sequence (S for the blocks past the real ones) and first token, i32[NB] each.

    The block -> sequence search is unrolled: XLA runs a `while` loop on the GPU one host round trip per iteration,
    outside the step's CUDA graph, which made every mixed step wait for the device before the host could launch
    the rest of it (docs/perf-notes.md#no-host-loop-in-mixed-steps)."""
    num_seqs = query_start_loc.shape[0] - 1
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    blocks_end = jnp.cumsum(pl.cdiv(q_lens, block_q))  # i32[S]
    # Heaviest blocks (last of each sequence, most causal context) first: fewer programs left in the tail wave.
    block = num_blocks - 1 - jnp.arange(num_blocks, dtype=jnp.int32)
    blk_seq = jnp.searchsorted(blocks_end, block, side="right", method="scan_unrolled").astype(jnp.int32)
    blk_seq_c = jnp.minimum(blk_seq, num_seqs - 1)
    first_block = jnp.where(blk_seq < num_seqs, blocks_end[blk_seq_c] - pl.cdiv(q_lens[blk_seq_c], block_q),
                            blocks_end[-1])
    first_tok = jnp.where(blk_seq < num_seqs, query_start_loc[blk_seq_c], query_start_loc[-1])
    return blk_seq, (first_tok + (block - first_block) * block_q).astype(jnp.int32)
