"""The write of a step's new keys and values into the paged KV cache, in plain XLA (the kernels' paths fuse it).

Legend: T tokens, K kv-heads, H head_dim, P pages, B tokens per page.
"""

import jax
import jax.numpy as jnp


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array):
    """Write the step's new keys/values into their slots. With donated pages XLA updates them in place.

    k_pages, v_pages: [K, P, B, H]; k, v: [T, K, H]; slot_mapping: i32[T] (page * B + offset).
    """
    page_size = k_pages.shape[2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size

    # Index the 4-D pages directly: scattering through a reshaped (bitcast) view made XLA copy the whole cache
    # whenever the same step also read it back (seen on CPU).
    def write(pages, new):
        return pages.at[:, page, offset].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype))

    return write(k_pages, k), write(v_pages, v)
