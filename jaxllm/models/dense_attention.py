"""Causal self-attention over whole sequences in pure jnp: the attention of the dense forward (`model(ids)`), which
has no KV cache and differentiates like any jnp expression.

Legend: B sequences, T query positions, U key positions (= T), C kv-head slots, G q-heads per slot, N = C * G
q-heads, H head_dim.

Numerics follow the kernels' reference (pallas_kernels.ragged_paged_attention_reference): logits and softmax in
float32, the output cast back to the input dtype; a sliding window W shows each position the keys after its own - W.
"""

import jax
import jax.numpy as jnp


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     sliding_window: int | None) -> jax.Array:
    """q [B, T, N, H], k and v [B, T, C, H] (q-head n attends with slot n // G) -> [B, T, N, H]."""
    b, t, n, h = q.shape
    c = k.shape[2]
    q = q.reshape(b, t, c, n // c, h).astype(jnp.float32)
    logits = jnp.einsum("BTCGH,BUCH->BCGTU", q, k.astype(jnp.float32)) * scale
    query, key = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = key <= query  # [T, U]
    if sliding_window is not None:
        visible &= key > query - sliding_window
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("BCGTU,BUCH->BTCGH", probs, v.astype(jnp.float32))
    return out.reshape(b, t, n, h).astype(v.dtype)
