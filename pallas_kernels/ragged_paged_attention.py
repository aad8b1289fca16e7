"""Ragged paged attention: one call for a batch mixing prefill chunks and decodes over a paged KV cache.

Legend: T tokens, S sequences, N q-heads, K kv-heads (N % K == 0), G = N // K q-heads per kv-head, H head_dim,
P pages (blocks), B tokens per page, M pages per sequence in the block table, C context positions (M * B).

Sequence s owns query tokens [query_start_loc[s], query_start_loc[s + 1]); they are its last q_len positions, so
query token i of s sits at position seq_lens[s] - q_len + i and attends causally to positions <= its own (and,
with a sliding window W, to positions > its own - W).
"""

import functools

import jax

from pallas_kernels.backend import REFERENCE, XLA, resolve_backend
from pallas_kernels.decode_attention_kernel import DecodeConfig, decode_attention_triton
from pallas_kernels.ragged_attention_kernel import RaggedConfig, ragged_attention_triton
from pallas_kernels.ragged_paged_attention_reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla


def _check_shapes(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc):
    if q.ndim != 3 or k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q [T, N, H] and pages [K, P, B, H]; got q {q.shape}, k {k_pages.shape}, "
                         f"v {v_pages.shape}")
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_pages.shape[0]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and pages ({k_pages.shape[3]}) differ")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"block_tables {block_tables.shape}, seq_lens {seq_lens.shape} and query_start_loc "
                         f"{query_start_loc.shape} disagree on the number of sequences")


@functools.partial(jax.jit, static_argnames=(
    "scale", "sliding_window", "soft_cap", "decode_only", "backend", "ragged_config", "decode_config", "interpret"))
def ragged_paged_attention(
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
    decode_only: bool = False,
    backend: str = "auto",
    ragged_config: RaggedConfig | None = None,
    decode_config: DecodeConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """Attention of the step's queries over their paged context; the step's own K/V must already be written.

    backend: "auto" (Pallas Triton kernels on a GPU, the chunked XLA path elsewhere), "triton", "xla" or
        "reference".
    decode_only: every sequence brings exactly one token; selects the flash-decoding kernel.
    interpret: run the Pallas kernels in the CPU interpreter (tests).
    Padding tokens (after query_start_loc[-1]) get a zero output.
    """
    _check_shapes(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be > 0 or None; got {soft_cap}")
    backend = resolve_backend(backend)
    args = (q, k_pages, v_pages, block_tables, seq_lens, query_start_loc)
    knobs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if backend == REFERENCE:
        return ragged_paged_attention_reference(*args, **knobs)
    if backend == XLA:
        return ragged_paged_attention_xla(*args, **knobs)
    if decode_only:
        if q.shape[0] != block_tables.shape[0]:
            raise ValueError(f"decode_only needs one token per sequence: q has {q.shape[0]} tokens, "
                             f"block_tables {block_tables.shape[0]} sequences")
        return decode_attention_triton(*args, **knobs, config=decode_config or DecodeConfig(),
                                       interpret=interpret)
    return ragged_attention_triton(*args, **knobs, config=ragged_config or RaggedConfig(), interpret=interpret)
