"""Weight-only quantized matmul (W4A16 / W8A16 with group scales and zeros): the jitted entry.

Legend: M rows of activations, K input features, N output features, G rows per group (K for per-channel),
E = 32 // bits values per packed word. Layout: quant_pack.py.
"""

import functools

import jax

from pallas_kernels.quant_matmul_reference import quant_matmul_reference
from pallas_kernels.quant_pack import values_per_word


@functools.partial(jax.jit, static_argnames=("bits", "backend", "interpret"))
def quant_matmul(
    x: jax.Array,  # [M, K] activations (bf16 / f16 / f32)
    qweight: jax.Array,  # i32[K / E, N]
    scales: jax.Array,  # [K / G, N]
    zeros: jax.Array,  # [K / G, N]: in the integer domain, so w = (q - zeros) * scales
    *,
    bits: int,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:  # [M, N] in x's dtype
    """x @ dequantize(qweight, scales, zeros). backend: pallas_kernels.backend's names; the Pallas kernel runs on
    "triton", every other backend runs the jnp expression (quant_matmul_reference.py)."""
    m, k = x.shape
    e = values_per_word(bits)
    if qweight.shape[0] * e != k:
        raise ValueError(f"qweight of {qweight.shape[0]} packed rows holds {qweight.shape[0] * e} inputs, x has {k}")
    if scales.shape != zeros.shape or scales.shape[1] != qweight.shape[1] or k % scales.shape[0]:
        raise ValueError(f"scales {scales.shape} and zeros {zeros.shape} are not [K / G, N] groups of "
                         f"qweight {qweight.shape} (K = {k})")
    del backend, interpret  # the kernel joins here
    return quant_matmul_reference(x, qweight, scales, zeros, bits=bits)
