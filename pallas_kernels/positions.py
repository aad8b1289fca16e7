"""Where each of a ragged step's tokens sits: shared by the pure-XLA attention paths."""

import jax
import jax.numpy as jnp


def token_positions(seq_lens: jax.Array, query_start_loc: jax.Array, num_tokens: int):
    """For each of the step's tokens: its sequence i32[T] (padding tokens: the last one), its position i32[T] and
    whether it is real bool[T] (padding tokens come after query_start_loc[-1])."""
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    # Unrolled: a `while` loop would run outside the step's CUDA graph, one host round trip per iteration.
    seq = jnp.minimum(jnp.searchsorted(query_start_loc[1:], token, side="right", method="scan_unrolled"),
                      seq_lens.shape[0] - 1)
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    return seq, seq_lens[seq] - q_len + (token - query_start_loc[seq]), token < query_start_loc[-1]
