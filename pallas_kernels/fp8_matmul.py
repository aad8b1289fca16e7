"""FP8 (e4m3) weights with per-channel scales, as compressed-tensors' float-quantized checkpoints store them: the
jitted entry. XLA serves it: its GEMM rewriter fuses the weight's convert into the dot, and on a GPU an e4m3 x e4m3
dot_general with f32 accumulation becomes cuBLASLt's FP8 GEMM.

Legend: M rows of activations, K input features, N output features.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import REFERENCE, TRITON, resolve_backend
from pallas_kernels.fp8_matmul_reference import fp8_matmul_reference, quantize_rows


@functools.partial(jax.jit, static_argnames=("dynamic_activations", "backend"))
def fp8_matmul(
    x: jax.Array,  # [M, K] activations (bf16 / f16 / f32)
    weight: jax.Array,  # float8_e4m3fn[K, N]
    scales: jax.Array,  # f32[1, N]: a per-tensor scale broadcast over N
    *,
    dynamic_activations: bool,
    backend: str = "auto",
) -> jax.Array:  # [M, N] in x's dtype
    """x @ (weight * scales). dynamic_activations (`input_activations: {dynamic: true, strategy: token}`): x is
    rounded to e4m3 per row with scale max|x_row| / 448 and multiplied in FP8 where the backend has an FP8 dot (a
    GPU: backend "triton", as "auto" picks there), else in float32 from the same e4m3 values (the products of two
    e4m3 values are exact in float32, so only the summation order differs). backend "reference": the oracle."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"expected x [M, K] and weight [K, N]; got x {x.shape}, weight {weight.shape}")
    if weight.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn; got {weight.dtype}")
    if scales.shape != (1, weight.shape[1]):
        raise ValueError(f"scales {scales.shape} must be [1, N] for weight {weight.shape}")
    backend = resolve_backend(backend)
    if backend == REFERENCE:
        return fp8_matmul_reference(x, weight, scales, dynamic_activations=dynamic_activations)
    scales = scales.astype(jnp.float32)
    if not dynamic_activations:
        out = jnp.dot(x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
        return (out * scales).astype(x.dtype)
    xq, row_scale = quantize_rows(x)
    if backend == TRITON:
        out = jax.lax.dot_general(xq, weight, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        out = jnp.dot(xq.astype(jnp.float32), weight.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (out * row_scale * scales).astype(x.dtype)
