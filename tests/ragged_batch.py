"""A random ragged batch over a paged KV cache, laid out as the runner lays it out: for tests and benchmarks.

Legend: T tokens, S sequences, N q-heads, K kv-heads, H head_dim, P pages, B tokens per page, M pages per sequence.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    q: jax.Array  # [T, N, H]
    k_pages: jax.Array  # [K, P, B, H]
    v_pages: jax.Array  # [K, P, B, H]
    block_tables: jax.Array  # i32[S, M]
    seq_lens: jax.Array  # i32[S]
    query_start_loc: jax.Array  # i32[S + 1]

    @property
    def args(self) -> tuple:
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.seq_lens, self.query_start_loc)

    @property
    def num_real_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def make_ragged_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype=jnp.float32,
    pad_tokens: int = 0,
    pad_seqs: int = 0,
    spare_pages: int = 3,
    seed: int = 0,
) -> RaggedBatch:
    """Sequence s brings q_lens[s] new tokens and has ctx_lens[s] >= q_lens[s] positions after the step.

    Pages are handed out in a shuffled order (block tables are not monotonic), page 0 stays the null block that
    padding table entries point at, and every page holds random data, so a kernel that reads the wrong page or
    position gets a different answer. Padding sequences (no tokens, length 0) and padding tokens go at the end.
    """
    assert len(q_lens) == len(ctx_lens) and all(c >= q >= 1 for q, c in zip(q_lens, ctx_lens))
    rng = np.random.default_rng(seed)
    pages_needed = [-(-c // page_size) for c in ctx_lens]
    pages_per_seq = max(pages_needed) + 1  # one padding entry at least, pointing at the null block
    num_pages = 1 + sum(pages_needed) + spare_pages
    order = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(q_lens) + pad_seqs, pages_per_seq), np.int32)
    taken = 0
    for s, n in enumerate(pages_needed):
        tables[s, :n] = order[taken:taken + n]
        taken += n
    num_tokens = sum(q_lens) + pad_tokens
    key_q, key_k, key_v = jax.random.split(jax.random.key(seed), 3)
    kv_shape = (num_kv_heads, num_pages, page_size, head_dim)
    return RaggedBatch(
        q=jax.random.normal(key_q, (num_tokens, num_q_heads, head_dim), jnp.float32).astype(dtype),
        k_pages=jax.random.normal(key_k, kv_shape, jnp.float32).astype(dtype),
        v_pages=jax.random.normal(key_v, kv_shape, jnp.float32).astype(dtype),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(list(ctx_lens) + [0] * pad_seqs, jnp.int32),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens), [sum(q_lens)] * pad_seqs]), jnp.int32),
    )
