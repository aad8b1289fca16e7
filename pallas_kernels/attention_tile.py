"""One context tile of paged attention inside a Pallas kernel: gather its K/V through the block table, score it
against a block of query rows and fold it into the running (flash) softmax. Shared by the ragged and decode kernels.

Legend: R query rows of a program (tokens x q-heads of one kv-head), C context positions of a tile (block_k),
H head_dim, B tokens per page, M pages per sequence in the block table.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# A finite mask instead of -inf: a row whose first tiles are fully masked then gets exp2(mask - mask) = 1 on them,
# and the first visible key rescales that by exp2(mask - m) = 0 (FlashAttention-2, "Use m_next"); -inf would give
# exp2(-inf + inf) = NaN. Every real query row sees at least itself, so the bogus early sum is always wiped.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class TileMath:
    """Static scalars of the score function, folded so the kernel multiplies once per logit."""

    scale: float
    soft_cap: float | None
    sliding_window: int | None

    def logits(self, s: jax.Array) -> jax.Array:
        """Raw q.k -> base-2 logits (softmax then uses exp2, one fewer multiply than exp)."""
        if self.soft_cap is None:
            return s * (self.scale * LOG2E)
        return jnp.tanh(s * (self.scale / self.soft_cap)) * (self.soft_cap * LOG2E)


def kv_slots(bt_ref, seq, pos: jax.Array, *, page_size: int) -> jax.Array:
    """Flat slot (page * B + offset) of context positions `pos` (i32[C]) of sequence `seq` in bt_ref (i32[S, M]).

    Positions past the sequence's table are clamped onto its last entry: they are masked out of the scores, and the
    clamp keeps every address inside real cache memory (padding entries point at the null block, never past P).
    """
    pages_per_seq = bt_ref.shape[1]
    page_idx = jnp.minimum(lax.div(pos, page_size), pages_per_seq - 1)
    pages = bt_ref[seq, page_idx]  # i32[C]
    return pages * page_size + lax.rem(pos, page_size)


def _indexer(leading: tuple, head_dim: int):
    """All-integer indexer (scalars and i32[R] rows, then the columns) and the column mask, or None.

    Integer indexers on every axis are the one form that both the Triton lowering and the CPU interpreter take
    with a mask. Triton tiles are powers of 2, so other head dims are widened with clamped, masked columns.
    """
    padded = pl.next_power_of_2(head_dim)
    col = jnp.arange(padded, dtype=jnp.int32)
    col_mask = None
    if padded != head_dim:
        col_mask = (col < head_dim)[None, :]
        col = jnp.minimum(col, head_dim - 1)
    rows = tuple(x[:, None] if jnp.ndim(x) else x for x in leading)
    return (*rows, col[None, :]), col_mask


def gather_rows(ref, leading: tuple, head_dim: int) -> jax.Array:
    """ref[*leading, :H] as [R, Hp]; the columns past H (if any) are 0 so they add nothing to q.k or p.v."""
    idx, col_mask = _indexer(leading, head_dim)
    if col_mask is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=col_mask, other=0)


def scatter_rows(ref, leading: tuple, value: jax.Array, row_ok: jax.Array, head_dim: int) -> None:
    """Store value [R, Hp] to ref[*leading, :H] where row_ok.

    The CPU interpreter stores by read-modify-write scatter, so two rows of one store must never share an address:
    callers pass unclamped indices (out-of-range ones are dropped there, masked on the GPU).
    """
    idx, col_mask = _indexer(leading, head_dim)
    mask = row_ok[:, None] if col_mask is None else row_ok[:, None] & col_mask
    plgpu.store(ref.at[idx], value.astype(ref.dtype), mask=mask)


def flash_update(carry, q, k, v, visible, tile_math: TileMath):
    """Fold one tile into (acc f32[R, H], m f32[R], l f32[R]): online softmax in base 2."""
    acc, m_prev, l_prev = carry
    s = plgpu.dot(q, k, trans_b=True)  # f32[R, C]
    s = jnp.where(visible, tile_math.logits(s), MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])  # m_next, not the tile max, so l needs no second correction
    l_next = l_prev * alpha + p.sum(axis=-1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l_next


def init_carry(rows: int, head_dim: int):
    acc = jnp.zeros((rows, head_dim), jnp.float32)
    m = jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    return acc, m, l
