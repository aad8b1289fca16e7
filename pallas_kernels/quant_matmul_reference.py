"""The weight-only quantized matmul as a plain jnp expression: the oracle of the kernel's tests, and the path of
every backend without the kernel (CPU serving, the dense research forward, which it keeps differentiable in the
scales and zeros).

Legend: M rows of activations, K input features, N output features, G rows per group, K / G groups.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.quant_pack import unpack_int


def dequantize(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, bits: int) -> jax.Array:
    """-> f32 [K, N]: (q - zeros) * scales, each group's row of scales and zeros shared by its G rows."""
    q = unpack_int(qweight, bits)  # [K, N]
    groups = scales.shape[0]
    g = q.shape[0] // groups
    q = q.reshape(groups, g, -1).astype(jnp.float32)
    w = (q - zeros.astype(jnp.float32)[:, None]) * scales.astype(jnp.float32)[:, None]
    return w.reshape(q.shape[0] * g, -1)


def quant_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                           bits: int) -> jax.Array:
    """x [M, K] @ dequantize(...) [K, N] -> [M, N] in x's dtype, accumulated in float32."""
    w = dequantize(qweight, scales, zeros, bits)
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
