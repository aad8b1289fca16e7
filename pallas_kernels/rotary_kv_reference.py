"""Rotary position embedding and the KV-cache write in pure jnp: the oracle of rotary_kv_kernel.py.

Legend: T tokens, N q-heads, K kv-heads, H head_dim, R = H // 2 rotary frequencies, P pages, B tokens per page,
W = (N + 2K) * H the width of one token's fused q/k/v projection (q heads, then k heads, then v heads).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.kv_write import write_kv


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, N, H]; cos, sin [T, R]. Hugging Face's rotate_half convention: dims i and i + R form a pair (not
    interleaved). The expression the kernel is tested against, and the path of every other backend."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, N, R] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)



def rotary_write_kv_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                              v_pages: jax.Array, slot_mapping: jax.Array, *, num_q_heads: int):
    """The jnp expression of `rotary_write_kv`: the kernel's oracle, and the path of every other backend."""
    num_tokens = qkv.shape[0]
    num_kv_heads, head_dim = k_pages.shape[0], k_pages.shape[3]
    heads = qkv.reshape(num_tokens, -1, head_dim)
    q = apply_rotary(heads[:, :num_q_heads], cos, sin)
    key = apply_rotary(heads[:, num_q_heads:num_q_heads + num_kv_heads], cos, sin)
    k_pages, v_pages = write_kv(k_pages, v_pages, key, heads[:, num_q_heads + num_kv_heads:], slot_mapping)
    return q, k_pages, v_pages
