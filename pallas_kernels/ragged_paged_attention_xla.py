"""Ragged paged attention in plain XLA whose cost follows each token's real context: the CPU serving path.

The reference gathers the whole block-table width (max_model_len positions) for every token, which is right as an
oracle but makes a CPU decode step cost O(max_model_len). This path walks each token's context in chunks of pages
with an online softmax and a data-dependent trip count, so a step costs O(actual context), and no new shapes are
compiled as sequences grow.

Legend: T tokens, S sequences, N q-heads, K kv-heads, G = N // K, H head_dim, B page size, C chunk positions.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.positions import token_positions


def ragged_paged_attention_xla(
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
    chunk_positions: int = 128,
    token_chunk: int = 32,
) -> jax.Array:  # [T, N, H]
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    pages_per_chunk = max(1, min(pages_per_seq, chunk_positions // page_size))
    chunk = pages_per_chunk * page_size
    num_chunks = -(-pages_per_seq // pages_per_chunk)
    # Pad the tables to whole chunks with page 0 (the null page); those positions are masked as > the query's.
    tables = jnp.pad(block_tables, ((0, 0), (0, num_chunks * pages_per_chunk - pages_per_seq)))

    seq, q_pos, is_real = token_positions(seq_lens, query_start_loc, num_tokens)
    offsets = jnp.arange(chunk, dtype=jnp.int32)  # [C]

    def attend(args):
        q_t, seq_t, pos_t, real = args
        q_g = q_t.reshape(num_kv_heads, group, head_dim).astype(jnp.float32) * scale  # [K, G, H]
        first = 0 if sliding_window is None else jnp.maximum(pos_t - sliding_window + 1, 0) // chunk
        last = jnp.where(real, pos_t // chunk + 1, first)  # padding tokens do no work

        def body(c, carry):
            m, l, acc = carry  # [K, G], [K, G], [K, G, H]
            pos = c * chunk + offsets
            pages = jax.lax.dynamic_slice(tables[seq_t], (c * pages_per_chunk,), (pages_per_chunk,))
            # Gather from the 4-D pages: a reshaped view of a cache the step also writes makes XLA copy it.
            page, offset = pages[offsets // page_size], offsets % page_size  # [C], [C]
            k = k_pages[:, page, offset].astype(jnp.float32)  # [K, C, H]
            v = v_pages[:, page, offset].astype(jnp.float32)
            s = jnp.einsum("KGH,KCH->KGC", q_g, k)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            visible = pos <= pos_t
            if sliding_window is not None:
                visible &= pos > pos_t - sliding_window
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            return m_new, l * correction + p.sum(-1), acc * correction[..., None] + jnp.einsum("KGC,KCH->KGH", p, v)

        init = (jnp.full((num_kv_heads, group), -jnp.inf), jnp.zeros((num_kv_heads, group)),
                jnp.zeros((num_kv_heads, group, head_dim)))
        _, l, acc = jax.lax.fori_loop(first, last, body, init)
        return (acc / jnp.where(l > 0, l, 1.0)[..., None]).reshape(num_q_heads, head_dim)

    out = jax.lax.map(attend, (q, seq, q_pos, is_real), batch_size=min(token_chunk, num_tokens))
    return jnp.where(is_real[:, None, None], out, 0).astype(q.dtype)
