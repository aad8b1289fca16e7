"""Residual add + RMSNorm in one Pallas (Triton lowering) kernel: `s = x + h`, `out = weight * rmsnorm(s)`.

Legend: T tokens, D hidden size (a power of 2: a Triton block holds a whole row).

A decoder layer adds a sublayer's output to the residual stream and normalizes the sum for the next sublayer,
twice per layer. XLA:GPU emits that as three launch-bound kernels at batch 1 (the add, the mean of squares, the
scaling). Here one program reads a row of x and h once and writes the sum and the normed row
(docs/perf-notes.md#fused-residual-add-and-rmsnorm).

Numerics are the XLA expression's, step for step: the add in the input dtype, the mean of squares and the scaling
in float32, rounded back to the input dtype before the weight multiply (Hugging Face's order).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def supports(hidden_size: int) -> bool:
    """Whether the kernel takes rows of this width (a whole row is one power-of-2 block)."""
    return hidden_size >= 16 and hidden_size & (hidden_size - 1) == 0


def _kernel(x_ref, h_ref, w_ref, sum_ref, out_ref, *, eps: float):
    s = x_ref[...] + h_ref[...]  # [1, D]
    sum_ref[...] = s
    s32 = s.astype(jnp.float32)
    normed = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    out_ref[...] = w_ref[...][None, :] * normed.astype(s.dtype)


def add_rms_norm_triton(x: jax.Array, h: jax.Array, weight: jax.Array, *, eps: float, num_warps: int = 4,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x, h [T, D], weight [D] -> (x + h, RMSNorm(x + h) * weight), both [T, D] in x's dtype. One program per row."""
    num_tokens, hidden = x.shape
    if not supports(hidden):
        raise ValueError(f"add_rms_norm_triton needs a power-of-2 hidden size >= 16; got {hidden}")
    row = pl.BlockSpec((1, hidden), lambda t: (t, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(num_tokens,),
        in_specs=[row, row, pl.BlockSpec((hidden,), lambda t: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name="add_rms_norm",
    )(x, h, weight.astype(x.dtype))
