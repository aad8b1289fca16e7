"""Whole-block KV operations the scheduler asks for: copy-on-write copies and swapping to and from host memory.

Block lists are padded to powers of two with the null block so each op compiles for few shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kv_cache import NULL_BLOCK, KVCache


def _padded(indices: list[int]) -> np.ndarray:
    size = 1 << max(0, (len(indices) - 1).bit_length())
    return np.asarray(list(indices) + [NULL_BLOCK] * (size - len(indices)), np.int32)


@functools.partial(jax.jit, donate_argnames="kv_cache")
def _copy(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    return KVCache(k=tuple(k.at[:, dst].set(k[:, src]) for k in kv_cache.k),
                   v=tuple(v.at[:, dst].set(v[:, src]) for v in kv_cache.v))


@jax.jit
def _gather(kv_cache: KVCache, blocks: jax.Array):
    return jnp.stack([k[:, blocks] for k in kv_cache.k]), jnp.stack([v[:, blocks] for v in kv_cache.v])


@functools.partial(jax.jit, donate_argnames="kv_cache")
def _scatter(kv_cache: KVCache, blocks: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array) -> KVCache:
    return KVCache(k=tuple(k.at[:, blocks].set(kb) for k, kb in zip(kv_cache.k, k_blocks)),
                   v=tuple(v.at[:, blocks].set(vb) for v, vb in zip(kv_cache.v, v_blocks)))


def copy_blocks(kv_cache: KVCache, pairs: list[tuple[int, int]]) -> KVCache:
    """Copy device block src to dst for each (src, dst); the cache is donated."""
    if not pairs:
        return kv_cache
    src, dst = zip(*pairs)
    return _copy(kv_cache, _padded(list(src)), _padded(list(dst)))


class HostSwapSpace:
    """Host-memory copies of swapped-out blocks, keyed by the scheduler's CPU block ids.

    Filled on demand: the scheduler bounds how many CPU blocks exist (swap_space), so nothing is preallocated."""

    def __init__(self):
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # cpu block -> (k [L, K, B, H], v [L, K, B, H])

    def __len__(self) -> int:
        return len(self._blocks)

    def swap_out(self, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host for each (device block, cpu block)."""
        if not pairs:
            return
        device_blocks, cpu_blocks = zip(*pairs)
        k, v = jax.device_get(_gather(kv_cache, _padded(list(device_blocks))))  # [L, K, n, B, H]
        for i, cpu in enumerate(cpu_blocks):
            self._blocks[cpu] = (k[:, :, i].copy(), v[:, :, i].copy())

    def swap_in(self, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> KVCache:
        """Copy host blocks back for each (cpu block, device block) and forget them; the cache is donated."""
        if not pairs:
            return kv_cache
        cpu_blocks, device_blocks = zip(*pairs)
        blocks = _padded(list(device_blocks))
        k = np.stack([self._blocks[c][0] for c in cpu_blocks], axis=2)
        v = np.stack([self._blocks[c][1] for c in cpu_blocks], axis=2)
        pad = len(blocks) - len(cpu_blocks)
        if pad:  # padding entries rewrite the null block with its own contents' shape; values are irrelevant
            k = np.concatenate([k, np.repeat(k[:, :, :1], pad, axis=2)], axis=2)
            v = np.concatenate([v, np.repeat(v[:, :, :1], pad, axis=2)], axis=2)
        for c in cpu_blocks:
            del self._blocks[c]
        return _scatter(kv_cache, blocks, k, v)
