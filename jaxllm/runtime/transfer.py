"""The sampler's inputs in one transfer: every numpy leaf of a pytree packed into a single i32 buffer.

Leaves are bit-cast (f32, u32 -> i32) or widened (bool -> i32) on the host and restored on the device by static
slices, so the packed layout is part of the jit's static arguments and the device sees one contiguous copy.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Static description of a packed pytree: its structure and each leaf's shape and dtype."""

    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype name) per leaf

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.leaves)


def _as_i32(leaf: np.ndarray) -> np.ndarray:
    if leaf.dtype == np.bool_:
        return leaf.astype(np.int32).reshape(-1)
    assert leaf.dtype.itemsize == 4, leaf.dtype
    return np.ascontiguousarray(leaf).view(np.int32).reshape(-1)


@functools.cache
def _name(dtype: np.dtype) -> str:
    return dtype.name  # numpy builds the name in Python at every read (docs/perf-notes.md#host-work-per-step)


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [np.asarray(leaf) for leaf in leaves]
    layout = PackedLayout(treedef, tuple((leaf.shape, _name(leaf.dtype)) for leaf in leaves))
    return np.concatenate([_as_i32(leaf) for leaf in leaves] or [np.zeros(0, np.int32)]), layout


def unpack(buffer: jax.Array, layout: PackedLayout):
    """Inside jit: rebuild the pytree from `buffer`."""
    leaves, offset = [], 0
    for shape, dtype in layout.leaves:
        size = math.prod(shape)
        flat = jax.lax.slice(buffer, (offset,), (offset + size,))
        offset += size
        if dtype == "bool":
            leaf = flat != 0
        elif dtype == "int32":
            leaf = flat
        else:
            leaf = jax.lax.bitcast_convert_type(flat, jnp.dtype(dtype))
        leaves.append(leaf.reshape(shape))
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)
