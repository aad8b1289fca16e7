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
    """Static scalars of the score function. Without a soft-cap the softmax scale (and log2 e, for exp2) is folded
    into q once per program, which takes a multiply per logit off the inner loop."""

    scale: float
    soft_cap: float | None
    sliding_window: int | None
    half_exp: bool = False  # p = exp2 in bf16/fp16 pairs (ex2.approx.*x2, sm_90): see flash_update

    def prepare_q(self, q: jax.Array) -> jax.Array:
        if self.soft_cap is not None:
            return q
        return (q.astype(jnp.float32) * (self.scale * LOG2E)).astype(q.dtype)

    def logits(self, s: jax.Array) -> jax.Array:
        """q.k of a prepared q -> base-2 logits."""
        if self.soft_cap is None:
            return s
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


def _indexer(leading: tuple, width: int, first_column: int, *, clamp_columns: bool):
    """All-integer indexer (scalars and i32[R] rows, then columns first_column .. first_column + width) and the
    column mask, or None.

    Integer indexers on every axis are the one form that both the Triton lowering and the CPU interpreter take
    with a mask. Triton tiles are powers of 2, so other widths are widened with masked columns: clamped for
    loads (addresses stay inside the row), left out of range for stores (the interpreter's scatter drops them,
    where clamped ones would collide with the last real column).
    """
    padded = pl.next_power_of_2(width)
    col = jnp.arange(padded, dtype=jnp.int32)
    col_mask = None
    if padded != width:
        col_mask = (col < width)[None, :]
        if clamp_columns:
            col = jnp.minimum(col, width - 1)
    rows = tuple(x[:, None] if jnp.ndim(x) else x for x in leading)
    return (*rows, first_column + col[None, :]), col_mask


def gather_rows(ref, leading: tuple, width: int, first_column: int = 0, row_ok: jax.Array | None = None) -> jax.Array:
    """ref[*leading, first_column:first_column + width] as [R, Wp]; the columns past width (if any) are 0, so
    they add nothing to q.k or p.v. Rows where row_ok (bool[R]) is False are 0 and not read: a context tile's
    positions past the sequence's end cost no memory traffic."""
    idx, mask = _indexer(leading, width, first_column, clamp_columns=True)
    if row_ok is not None:
        rows = jnp.broadcast_to(row_ok[:, None], (row_ok.shape[0], pl.next_power_of_2(width)))
        mask = rows if mask is None else rows & mask
    if mask is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=mask, other=0)


def scatter_rows(ref, leading: tuple, value: jax.Array, row_ok: jax.Array, width: int, first_column: int = 0) -> None:
    """Store value [R, Wp] to ref[*leading, first_column:first_column + width] where row_ok.

    The CPU interpreter stores by read-modify-write scatter, so two rows of one store must never share an address:
    callers pass unclamped indices (out-of-range ones are dropped there, masked on the GPU). Masked columns inside
    the row (a first half's padding) are written back unchanged there.
    """
    idx, col_mask = _indexer(leading, width, first_column, clamp_columns=False)
    mask = row_ok[:, None] if col_mask is None else row_ok[:, None] & col_mask
    plgpu.store(ref.at[idx], value.astype(ref.dtype), mask=mask)


def flash_update(carry, q, k, v, visible: jax.Array | None, tile_math: TileMath):
    """Fold one tile into (acc f32[R, H], m f32[R], l f32[R]): online softmax in base 2.

    visible (bool[R, C]) is None for tiles that every row sees whole: no mask arithmetic on those.
    """
    acc, m_prev, l_prev = carry
    # HIGHEST keeps f32 inputs out of TF32 (3e-4 error); bf16/fp16 inputs are unaffected.
    s = tile_math.logits(plgpu.dot(q, k, trans_b=True, precision=lax.Precision.HIGHEST))  # f32[R, C]
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp2(m_prev - m_next)
    # m_next, not the tile max, so l needs no second correction.
    if tile_math.half_exp and v.dtype in (jnp.bfloat16, jnp.float16):
        # In prefill the multi-function unit's exp2 (16/clock/SM) takes about as long as the tensor-core work at
        # d = 128 (FlashAttention-3, section 3); the paired half-precision form does two per instruction. p is
        # rounded to v's dtype for p.v anyway; l sums that same rounded p.
        p = _exp2_pairs((s - m_next[:, None]).astype(v.dtype))
        p_sum = p.astype(jnp.float32).sum(axis=-1)
    else:
        p = jnp.exp2(s - m_next[:, None])
        p_sum = p.sum(axis=-1)
    l_next = l_prev * alpha + p_sum
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=lax.Precision.HIGHEST)
    return acc, m_next, l_next


def _exp2_pairs(x: jax.Array) -> jax.Array:
    asm = "ex2.approx.ftz.bf16x2 $0, $1;" if x.dtype == jnp.bfloat16 else "ex2.approx.f16x2 $0, $1;"
    [y] = plgpu.elementwise_inline_asm(asm, args=[x], constraints="=r,r", pack=2,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return y


def fit_shared_memory(block_k: int, num_stages: int, rows: int, head_dim: int, itemsize: int) -> tuple[int, int]:
    """Shrink (block_k, num_stages) until the pipelined K/V stages and the q tile fit Hopper's 227 KB of shared
    memory per block (fp32 and head_dim 256 overflow the bf16 d = 128 tuning). The sizes match what Triton asked
    for (docs/perf-notes.md#decode-and-prefill-kernel-tuning): 2 x 2 x 128 x 256 x 2 + 128 x 256 x 2 = 327,680 B
    for head_dim 256."""
    padded = pl.next_power_of_2(head_dim)

    def need(c, s):
        return (s * 2 * c * padded + rows * padded) * itemsize

    while need(block_k, num_stages) > 224 * 1024:
        if block_k > 32:
            block_k //= 2
        elif num_stages > 1:
            num_stages -= 1
        else:
            break
    return block_k, num_stages


def init_carry(rows: int, head_dim: int):
    acc = jnp.zeros((rows, head_dim), jnp.float32)
    m = jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32)
    l = jnp.zeros((rows,), jnp.float32)
    return acc, m, l


def sweep_tiles(bounds, body, carry):
    """Run body(t, carry, masked) over tiles [a, d) given as (a, b, c, d): [b, c) unmasked, the edges masked.

    Only the tiles that straddle the causal diagonal, the window's left edge or the context's end pay for the mask.
    """
    a, b, c, d = bounds
    carry = lax.fori_loop(a, b, lambda t, acc: body(t, acc, True), carry)
    carry = lax.fori_loop(b, c, lambda t, acc: body(t, acc, False), carry)
    return lax.fori_loop(c, d, lambda t, acc: body(t, acc, True), carry)


def clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)
