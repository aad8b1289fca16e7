"""Weight-only int4 / int8 matmul in one Pallas (Triton lowering) kernel, dequantizing the packed weight in registers.

Legend: M rows of activations, K input features, N output features, E = 32 // bits values per word, W = K / E packed
rows, G rows per group (K for per-channel), Gw = G / E packed rows per group, Bm x Bn an output tile, Bw packed rows
(Bw * E inputs) per step of the K loop, X splits of the K range. Layout: quant_pack.py.

Program (m, n, x) streams packed tiles [Bw, Bn] of its split of K, each word loaded once. Slice j of a tile (the
j-th value of every word) holds the weight rows w * E + j, so it is dequantized ((q - z) * s in float32, rounded
to x's dtype) and multiplied on the tensor cores with the x columns w * E + j, for each of the E slices: the
packed bytes cross the memory bus once and are never expanded in memory, and the K loop carries only the f32
accumulator. The GPTQ layout stays (quant_pack.py): unpacking it costs one mask per value (slice_positions), so an
interleaved order would save nothing in the kernel and would cost every loader a repack.

Two launch shapes (QuantMatmulConfig.for_rows). Decode-sized M (<= 64) pads M to 16 rows (the smallest dot),
gathers each slice's x columns with stride E straight from x (a few KB, in L1/L2), and splits K over X programs
when the M and N blocks alone leave the GPU's SMs idle (the o and down projections of a batch-1 step), the f32
partial sums added after. Larger M takes 64- or 128-row tiles, so each dequantized tile feeds a full-height dot,
over x deinterleaved once by XLA so that every slice's x tile is a contiguous load.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SMALL_M = 64  # the largest M that takes the decode launch shape
# An int q * 2**p < 2**23 or'ed into the bits of 2**23 reads as the float 2**23 + q * 2**p: the value masked in
# place, no shift and no integer-to-float convert (I2F runs at 1/8 of the FP32 rate on sm_90), then one subtract.
_MAGIC_BITS = 0x4B000000
_MAGIC = float(2**23)
_MANTISSA_BITS = 23


def slice_positions(bits: int) -> tuple[tuple[bool, int], ...]:
    """For each of a word's E values: (read from the word shifted right by 16, its bit position p there). A value
    is masked in place while it ends inside the float mantissa (p + bits <= 23); the top ones come from one shift
    of the word by 16 shared by all of them."""
    positions = []
    for j in range(32 // bits):
        p = j * bits
        positions.append((False, p) if p + bits <= _MANTISSA_BITS else (True, p - 16))
    return tuple(positions)


@dataclasses.dataclass(frozen=True)
class QuantMatmulConfig:
    """Tiles of the kernel. num_splits=None picks X so that the grid reaches about target_programs (two waves of an
    H100's 132 SMs), with at least min_split_tiles K steps per split."""

    block_m: int = 16  # Bm
    block_n: int = 128  # Bn
    block_words: int = 32  # Bw: the dot depth of each of the E slices; shrunk to Gw so a step sits in one group
    num_splits: int | None = None
    target_programs: int = 264
    min_split_tiles: int = 4
    num_warps: int = 4
    num_stages: int = 4
    # x regrouped as [M, E, W] (one XLA transpose) so each slice's x tile is one contiguous, pipelined load instead
    # of a stride-E gather: worth its copy of x when the x tiles are large (large M), not for a decode-sized x.
    deinterleave_x: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_words"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"QuantMatmulConfig.{name} must be a power of 2 >= 16 (a dot tile); got {size}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"QuantMatmulConfig.num_splits must be >= 1 or None; got {self.num_splits}")
        if self.target_programs < 1 or self.min_split_tiles < 1:
            raise ValueError("QuantMatmulConfig.target_programs and min_split_tiles must be >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"QuantMatmulConfig.num_warps must be a power of 2 <= 16; got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"QuantMatmulConfig.num_stages must be >= 1; got {self.num_stages}")

    @classmethod
    def for_rows(cls, m: int, itemsize: int = 2) -> "QuantMatmulConfig":
        """The launch shape for M rows of x (itemsize bytes each): decode-sized M pads to the smallest dot that
        holds it; larger M takes 64- or 128-row tiles over a deinterleaved x, and splits K only where M and N
        blocks leave SMs idle. 128-row tiles of a float32 x would not fit three pipeline stages in shared memory."""
        if m <= SMALL_M:
            return cls(block_m=max(16, pl.next_power_of_2(m)))
        if m <= 256 or itemsize > 2:
            return cls(block_m=64, num_stages=3, target_programs=132, deinterleave_x=True)
        return cls(block_m=128, num_warps=8, num_stages=3, target_programs=132, deinterleave_x=True)

    def step_words(self, group_words: int, num_groups: int) -> tuple[int, bool]:
        """(Bw, whether each K step lies in one group). One group per step loads one row of scales and zeros per
        step instead of a gathered [Bw, Bn] tile: Bw is shrunk to a power-of-2 divisor of Gw when that is still a
        dot (>= 16 rows)."""
        if num_groups == 1:
            return self.block_words, True
        bw = self.block_words
        while bw > 16 and group_words % bw:
            bw //= 2
        return bw, group_words % bw == 0

    def splits(self, programs: int, tiles: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        wanted = pl.cdiv(self.target_programs, programs)
        return max(1, min(wanted, tiles // self.min_split_tiles))


def _group_rows(ref, rows: jax.Array, cols: jax.Array, col_ok: jax.Array | None) -> jax.Array:
    """ref[rows, cols] in float32 ([R, Bn]; rows in range, the columns past N masked)."""
    idx = (rows[:, None], cols[None, :])
    if col_ok is None:
        return ref[idx].astype(jnp.float32)
    return plgpu.load(ref.at[idx], mask=jnp.broadcast_to(col_ok[None, :], (rows.shape[0], cols.shape[0])),
                      other=0).astype(jnp.float32)


def _kernel(
    x_ref,  # [M, K], or [M, E, W] deinterleaved: x_ref[m, j, w] = x[m, w * E + j]
    q_ref,  # i32[W, N]
    s_ref,  # [K / G, N]
    z_ref,  # [K / G, N]
    o_ref,  # X == 1: [M, N] in x's dtype. X > 1: f32[X, M, N]
    *,
    bits: int,
    block_m: int,
    block_n: int,
    block_words: int,
    group_words: int,
    one_group_per_step: bool,
    num_splits: int,
    deinterleave_x: bool,
):
    m_total = x_ref.shape[0]
    num_words, n_total = q_ref.shape
    e = 32 // bits
    mb, nb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = mb * block_m + jnp.arange(block_m, dtype=jnp.int32)
    cols = nb * block_n + jnp.arange(block_n, dtype=jnp.int32)
    row_ok = rows < m_total
    col_ok = None if n_total % block_n == 0 else cols < n_total
    single_group = s_ref.shape[0] == 1
    if single_group:  # per-channel: one row of scales and zeros for the whole program
        scale0 = _group_rows(s_ref, jnp.zeros((1,), jnp.int32), cols, col_ok)
        zero0 = _group_rows(z_ref, jnp.zeros((1,), jnp.int32), cols, col_ok)

    tiles = pl.cdiv(num_words, block_words)
    full_tiles = num_words // block_words
    per_split = pl.cdiv(tiles, num_splits)
    start = jnp.minimum(split * per_split, tiles)
    stop = jnp.minimum(start + per_split, tiles)
    full_stop = jnp.clip(full_tiles, start, stop)

    def step(t, acc, ragged: bool):
        words = t * block_words + jnp.arange(block_words, dtype=jnp.int32)  # packed rows of this K step
        word_ok = words < num_words if ragged else None
        safe_words = jnp.minimum(words, num_words - 1) if ragged else words
        idx = (safe_words[:, None], cols[None, :])
        if col_ok is None:
            packed = q_ref[idx]
        else:
            packed = plgpu.load(q_ref.at[idx], mask=jnp.broadcast_to(col_ok[None, :], (block_words, block_n)),
                                other=0)
        if single_group:
            scale, zero = scale0, zero0
        elif one_group_per_step:
            g = jnp.full((1,), t * block_words // group_words, jnp.int32)
            scale, zero = _group_rows(s_ref, g, cols, col_ok), _group_rows(z_ref, g, cols, col_ok)
        else:  # groups shorter than a step: each packed row's own group row (repeats hit L1)
            g = safe_words // group_words
            scale, zero = _group_rows(s_ref, g, cols, col_ok), _group_rows(z_ref, g, cols, col_ok)
        masks = ([row_ok[:, None]] if m_total % block_m else []) + ([word_ok[None, :]] if ragged else [])
        x_mask = None if not masks else jnp.broadcast_to(functools.reduce(jnp.logical_and, masks),
                                                         (block_m, block_words))
        # w = (q - z) * s as fma(q * 2**p, s * 2**-p, -z * s): both scalings by 2**p are exact, so one rounding of
        # q * s - z * s (z * s rounded once per tile). Per value: one LOP3, one FSUB, one FFMA and half a convert.
        zs = zero * scale
        scale_at = {p: scale * 2.0**-p for _, p in slice_positions(bits)}
        high = lax.shift_right_logical(packed, jnp.int32(16))
        for j, (from_high, p) in enumerate(slice_positions(bits)):
            src = high if from_high else packed
            in_place = (src & jnp.int32((2**bits - 1) << p)) | jnp.int32(_MAGIC_BITS)
            q_shifted = lax.bitcast_convert_type(in_place, jnp.float32) - _MAGIC  # q * 2**p, exact
            w = (q_shifted * scale_at[p] - zs).astype(x_ref.dtype)  # [Bw, Bn]
            # Columns w * E + j of x; rows past M and words past W read as 0, so clamped weight rows add nothing.
            if deinterleave_x:
                x_idx = (rows[:, None], j, words[None, :])
            else:
                x_idx = (rows[:, None], (words * e + j)[None, :])
            x = x_ref[x_idx] if x_mask is None else plgpu.load(x_ref.at[x_idx], mask=x_mask, other=0)
            acc = acc + plgpu.dot(x, w, precision=lax.Precision.HIGHEST)  # HIGHEST: f32 x stays out of TF32
        return acc

    acc = jnp.zeros((block_m, block_n), jnp.float32)
    acc = lax.fori_loop(start, full_stop, lambda t, a: step(t, a, False), acc)
    acc = lax.fori_loop(full_stop, stop, lambda t, a: step(t, a, True), acc)

    out_ok = row_ok[:, None] if col_ok is None else row_ok[:, None] & col_ok[None, :]
    out_ok = jnp.broadcast_to(out_ok, (block_m, block_n))
    if num_splits == 1:
        plgpu.store(o_ref.at[rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=out_ok)
    else:
        plgpu.store(o_ref.at[split, rows[:, None], cols[None, :]], acc, mask=out_ok)


def quant_matmul_triton(
    x: jax.Array,  # [M, K]
    qweight: jax.Array,  # i32[W, N]
    scales: jax.Array,  # [K / G, N]
    zeros: jax.Array,  # [K / G, N]
    *,
    bits: int,
    config: QuantMatmulConfig,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in x's dtype
    """x @ dequantize(qweight, scales, zeros) with shapes already checked by the entry (quant_matmul.py)."""
    m, _ = x.shape
    num_words, n = qweight.shape
    num_groups = scales.shape[0]
    group_words = num_words // num_groups
    block_words, one_group_per_step = config.step_words(group_words, num_groups)
    grid_m, grid_n = pl.cdiv(m, config.block_m), pl.cdiv(n, config.block_n)
    num_splits = config.splits(grid_m * grid_n, pl.cdiv(num_words, block_words))
    kernel = functools.partial(
        _kernel, bits=bits, block_m=config.block_m, block_n=config.block_n, block_words=block_words,
        group_words=group_words, one_group_per_step=one_group_per_step, num_splits=num_splits,
        deinterleave_x=config.deinterleave_x)
    if config.deinterleave_x:
        x = x.reshape(m, num_words, 32 // bits).transpose(0, 2, 1)
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((num_splits, m, n), jnp.float32)
    out = pl.pallas_call(
        kernel,
        grid=(grid_m, grid_n, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"quant_matmul_int{bits}",
    )(x, qweight, scales, zeros)
    if num_splits == 1:
        return out
    return out.sum(axis=0).astype(x.dtype)
