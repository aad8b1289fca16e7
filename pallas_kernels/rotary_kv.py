"""Rotary position embedding of the new queries and keys plus the write of the new keys and values into the paged
KV cache: the jitted entry (the Pallas kernel in rotary_kv_kernel.py, the jnp expression in rotary_kv_reference.py).

Legend: T tokens, N q-heads, K kv-heads, H head_dim, R = H // 2 rotary frequencies, P pages, B tokens per page,
W = (N + 2K) * H the width of one token's fused q/k/v projection (q heads, then k heads, then v heads).
"""

import jax

from pallas_kernels.backend import TRITON, resolve_backend
from pallas_kernels.rotary_kv_kernel import rotary_write_kv_triton
from pallas_kernels.rotary_kv_reference import rotary_write_kv_reference


def rotary_write_kv(
    qkv: jax.Array,  # [T, W]
    cos: jax.Array,  # [T, R]
    sin: jax.Array,  # [T, R]
    k_pages: jax.Array,  # [K, P, B, H]
    v_pages: jax.Array,  # [K, P, B, H]
    slot_mapping: jax.Array,  # i32[T]: page * B + offset
    *,
    num_q_heads: int,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # q [T, N, H] rotated, k_pages', v_pages'
    """Rotate q and k, write k and v into their slots; the pages are updated in place when the caller donates
    them. backend: "triton" (the kernel), anything else the jnp expression (rotary_kv_reference.py)."""
    num_tokens, width = qkv.shape
    num_kv_heads, _, _, head_dim = k_pages.shape
    if width != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv rows of {width} do not hold {num_q_heads} q-heads and 2 x {num_kv_heads} kv-heads "
                         f"of an even head_dim {head_dim}")
    if resolve_backend(backend) == TRITON:
        return rotary_write_kv_triton(qkv, cos, sin, k_pages, v_pages, slot_mapping, num_q_heads=num_q_heads,
                                       interpret=interpret)
    return rotary_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slot_mapping, num_q_heads=num_q_heads)
