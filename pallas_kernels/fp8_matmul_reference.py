"""The FP8-weight matmul as plain float32 jnp: the oracle of fp8_matmul's tests.

Legend: M rows of activations, K input features, N output features. E4M3_MAX = 448, the largest finite e4m3 value.
"""

import jax
import jax.numpy as jnp

E4M3_MAX = 448.0


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (e4m3 [M, K], f32 [M, 1] row scales): compressed-tensors' dynamic per-token activations,
    scale = max|x_row| / 448 (1 for an all-zero row, which then stays 0)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return jnp.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), scale


def fp8_matmul_reference(x: jax.Array, weight: jax.Array, scales: jax.Array, *,
                         dynamic_activations: bool) -> jax.Array:
    """x [M, K] @ (weight e4m3 [K, N] * scales f32 [1, N]) -> [M, N] in x's dtype; with dynamic_activations, x is
    first rounded to e4m3 per row (quantize_rows)."""
    w = weight.astype(jnp.float32)
    if dynamic_activations:
        xq, row_scale = quantize_rows(x)
        x32 = xq.astype(jnp.float32) * row_scale
    else:
        x32 = x.astype(jnp.float32)
    out = jnp.dot(x32, w, precision=jax.lax.Precision.HIGHEST) * scales.astype(jnp.float32)
    return out.astype(x.dtype)
