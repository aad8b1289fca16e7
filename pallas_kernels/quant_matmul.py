"""Weight-only quantized matmul (W4A16 / W8A16 with group scales and zeros): the jitted entry.

Legend: M rows of activations, K input features, N output features, G rows per group (K for per-channel),
E = 32 // bits values per packed word. Layout: quant_pack.py.
"""

import functools

import jax

from pallas_kernels.backend import TRITON, resolve_backend
from pallas_kernels.quant_matmul_kernel import QuantMatmulConfig, quant_matmul_triton
from pallas_kernels.quant_matmul_reference import quant_matmul_reference
from pallas_kernels.quant_pack import values_per_word


@functools.partial(jax.jit, static_argnames=("bits", "backend", "config", "interpret"))
def quant_matmul(
    x: jax.Array,  # [M, K] activations (bf16 / f16 / f32)
    qweight: jax.Array,  # i32[K / E, N]
    scales: jax.Array,  # [K / G, N]
    zeros: jax.Array,  # [K / G, N]: in the integer domain, so w = (q - zeros) * scales
    *,
    bits: int,
    backend: str = "auto",
    config: QuantMatmulConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [M, N] in x's dtype
    """x @ dequantize(qweight, scales, zeros). backend: pallas_kernels.backend's names; the Pallas kernel runs on
    "triton" ("auto" on a GPU), every other backend runs the jnp expression (quant_matmul_reference.py).
    config: the kernel's tiles (default: QuantMatmulConfig.for_rows(M, x's itemsize)); interpret: the kernel in the CPU
    interpreter (tests)."""
    if x.ndim != 2 or qweight.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"expected x [M, K], qweight [K / E, N], scales [K / G, N]; got x {x.shape}, "
                         f"qweight {qweight.shape}, scales {scales.shape}")
    m, k = x.shape
    e = values_per_word(bits)
    if qweight.shape[0] * e != k:
        raise ValueError(f"qweight of {qweight.shape[0]} packed rows holds {qweight.shape[0] * e} inputs, x has {k}")
    if scales.shape != zeros.shape or scales.shape[1] != qweight.shape[1] or k % scales.shape[0]:
        raise ValueError(f"scales {scales.shape} and zeros {zeros.shape} are not [K / G, N] groups of "
                         f"qweight {qweight.shape} (K = {k})")
    if (k // scales.shape[0]) % e:
        raise ValueError(f"groups of {k // scales.shape[0]} rows (scales {scales.shape}, K = {k}) do not hold "
                         f"whole words of {e} values")
    if resolve_backend(backend) != TRITON:
        return quant_matmul_reference(x, qweight, scales, zeros, bits=bits)
    config = config or QuantMatmulConfig.for_rows(m, x.dtype.itemsize)
    return quant_matmul_triton(x, qweight, scales, zeros, bits=bits, config=config, interpret=interpret)
