"""The packed layout of weight-only quantized matrices that the quantized matmul reads (quant_matmul.py).

Legend: K input features (rows), N output features (columns), E = 32 // bits values per int32 word.

`qweight` int32 [K / E, N], packed along K: word (r, n) holds rows r*E .. r*E + E - 1 of column n, row r*E + j in
bits [j*bits, (j+1)*bits). This is AutoGPTQ's qweight layout; every other format is repacked into it at load. The
values are unsigned (0 .. 2**bits - 1); what they mean is the matmul's `(q - zeros) * scales` per group of rows.
Packing along K keeps every column's bits in its own column, so the layout shards along N like the dense weight,
and along K in whole words (whole groups, as the loaders require).
"""

import jax
import jax.numpy as jnp
import numpy as np

BITS = (4, 8)


def values_per_word(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 32 // bits


def pack_int(values: np.ndarray, bits: int) -> np.ndarray:
    """uint values [K, N] (each < 2**bits, K a multiple of E) -> int32 [K / E, N], on the host."""
    e = values_per_word(bits)
    k, n = values.shape
    if k % e:
        raise ValueError(f"{k} rows do not pack into words of {e} values")
    v = values.astype(np.uint32)
    if v.max(initial=0) >= 2**bits:
        raise ValueError(f"values do not fit in {bits} bits")
    shifts = (np.arange(e, dtype=np.uint32) * bits)[None, :, None]  # [1, E, 1]
    words = np.bitwise_or.reduce(v.reshape(k // e, e, n) << shifts, axis=1)  # [K / E, N]
    return words.view(np.int32)


def unpack_int(qweight: jax.Array, bits: int) -> jax.Array:
    """int32 [K / E, N] -> int32 values [K, N] (jnp: on device, or on the host from a numpy array)."""
    e = values_per_word(bits)
    words = jnp.asarray(qweight).astype(jnp.uint32)
    shifts = (jnp.arange(e, dtype=jnp.uint32) * bits)[None, :, None]
    values = (words[:, None, :] >> shifts) & jnp.uint32(2**bits - 1)  # [K / E, E, N]
    return values.reshape(-1, words.shape[-1]).astype(jnp.int32)
