"""What the safetensors quantization formats share when they read one linear: fetching a tensor with its shape and
dtype checked, unpacking int32 words along either axis, resolving a group size, and the canonical int arrays.

Legend: K input features, N output features, G rows of K per group, E = 32 // bits values per int32 word.
"""

from collections.abc import Sequence

import numpy as np

from jaxllm.loading.loader import TensorSource
from pallas_kernels.quant_pack import BITS, pack_int, values_per_word


def check_bits(bits, field: str) -> int:
    if bits not in BITS:
        raise ValueError(f"{field} = {bits!r} is not supported; the quantized matmul reads bits {BITS}")
    return bits


def resolve_group_size(group_size, in_features: int, field: str, module: str) -> int:
    """-1 (or None: per channel) -> K; otherwise a positive divisor of K."""
    if group_size in (-1, None):
        return in_features
    if not isinstance(group_size, int) or group_size <= 0 or in_features % group_size:
        raise ValueError(f"{field} = {group_size!r} does not divide {module}'s {in_features} input features")
    return group_size


def read_tensor(source: TensorSource, name: str, shape: tuple[int, ...], dtypes: Sequence) -> np.ndarray:
    """The checkpoint tensor `name`, which must exist with this shape and one of these dtypes."""
    if name not in source.keys():
        raise ValueError(f"checkpoint tensor {name!r} is missing")
    if tuple(source.shape(name)) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(source.shape(name))}, expected {tuple(shape)}")
    if np.dtype(source.dtype(name)) not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"checkpoint tensor {name!r} has dtype {source.dtype(name)}, expected one of "
                         f"{[np.dtype(d).name for d in dtypes]}")
    return source.read(name)


def unpack_words(words: np.ndarray, bits: int, axis: int, order: Sequence[int] | None = None) -> np.ndarray:
    """int32 words -> uint8/uint16 values, E per word along `axis`; value `order[i]` of each run of E sits in bits
    [i*bits, (i+1)*bits) (None: value i in field i, the plain order)."""
    e = values_per_word(bits)
    order = np.arange(e) if order is None else np.asarray(order)
    w = np.moveaxis(words.view(np.uint32), axis, -1)  # [..., W]
    fields = (w[..., None] >> (np.arange(e, dtype=np.uint32) * bits)) & np.uint32(2**bits - 1)  # [..., W, E]
    values = np.empty_like(fields)
    values[..., order] = fields
    return np.moveaxis(values.reshape(*w.shape[:-1], -1), -1, axis).astype(np.int32)


def contiguous_groups(g_idx: np.ndarray, groups: int, name: str) -> np.ndarray:
    """The stable order of rows that makes each group's rows contiguous (GPTQ act-order, Marlin's permutation);
    every group must hold K / groups rows."""
    if g_idx.min() < 0 or g_idx.max() >= groups:
        raise ValueError(f"checkpoint tensor {name!r} has group indices outside [0, {groups})")
    counts = np.bincount(g_idx, minlength=groups)
    if np.any(counts != g_idx.size // groups):
        raise ValueError(f"checkpoint tensor {name!r} does not give every group {g_idx.size // groups} rows")
    return np.argsort(g_idx, kind="stable").astype(np.int32)


def int_arrays(values: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int,
               perm: np.ndarray | None) -> dict[str, np.ndarray]:
    """Canonical arrays (linear_quant.py) from unsigned values [K, N] in checkpoint row order, scales and integer-
    domain zeros [K / G, N] by group; with `perm`, the rows are reordered so row r is checkpoint row perm[r].
    Scales and zeros stay float32 here (exact for fp16 / bf16 inputs); the model casts them to its dtype."""
    if perm is not None:
        values = values[perm]
    arrays = {"qweight": pack_int(values, bits), "scales": scales.astype(np.float32),
              "zeros": zeros.astype(np.float32)}
    return arrays | ({"perm": perm} if perm is not None else {})
