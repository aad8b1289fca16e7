"""Ragged paged attention in pure jnp: the oracle of the kernel tests (the entry is ragged_paged_attention.py).

Legend: T tokens, S sequences, N q-heads, K kv-heads (N % K == 0), G = N // K q-heads per kv-head, H head_dim,
P pages (blocks), B tokens per page, M pages per sequence in the block table, C context positions (M * B).

Sequence s owns query tokens [query_start_loc[s], query_start_loc[s + 1]); they are its last q_len positions, so
query token i of s sits at position seq_lens[s] - q_len + i and attends causally to positions <= its own (and,
with a sliding window W, to positions > its own - W).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.positions import token_positions


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, B, H]
    v_pages: jax.Array,  # [K, P, B, H]
    block_tables: jax.Array,  # i32[S, M]
    seq_lens: jax.Array,  # i32[S]
    query_start_loc: jax.Array,  # i32[S + 1]
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    token_chunk: int = 64,
) -> jax.Array:  # [T, N, H]
    """Pure-jnp reference, the oracle of the kernel tests: gathers each token's whole block-table width of context
    from the pages (the chunked XLA path in ragged_paged_attention_xla.py is the CPU serving path).

    Tokens are processed in chunks of `token_chunk` so the gathered context stays bounded in memory.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    context = pages_per_seq * page_size

    seq, q_pos, is_real = token_positions(seq_lens, query_start_loc, num_tokens)

    k_flat = k_pages.reshape(num_kv_heads, -1, head_dim)
    v_flat = v_pages.reshape(num_kv_heads, -1, head_dim)
    kv_pos = jnp.arange(context, dtype=jnp.int32)  # [C]

    def attend(args):
        q_t, seq_t, pos_t = args  # [N, H], [], []
        slots = block_tables[seq_t][kv_pos // page_size] * page_size + kv_pos % page_size  # [C]
        k_ctx = k_flat[:, slots].astype(jnp.float32)  # [K, C, H]
        v_ctx = v_flat[:, slots].astype(jnp.float32)
        q_g = q_t.reshape(num_kv_heads, group, head_dim).astype(jnp.float32)
        logits = jnp.einsum("KGH,KCH->KGC", q_g, k_ctx) * scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        visible = kv_pos <= pos_t
        if sliding_window is not None:
            visible &= kv_pos > pos_t - sliding_window
        logits = jnp.where(visible, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("KGC,KCH->KGH", probs, v_ctx).reshape(num_q_heads, head_dim)

    out = jax.lax.map(attend, (q, seq, q_pos), batch_size=min(token_chunk, num_tokens))
    return jnp.where(is_real[:, None, None], out, 0).astype(q.dtype)
