"""The paged KV cache and the attention metadata: the contract between the runner, the models and the kernels.

Legend: T tokens in the step (padded to a bucket), S sequences (padded), P physical KV blocks, B tokens per block,
K kv-head slots, N q-heads, H head_dim, L layers, M max blocks per sequence.

K is the model's kv-head count, except under tensor parallelism with fewer kv-heads than devices: then each device
keeps its own slot of the head its q-heads use, and K = `sharding.kv_cache_heads(kv_heads, tp)`. The cache is split
over K on the "tp" mesh axis.

Block 0 is reserved as the null block: padding tokens write their K/V there and padding entries of a block table
point at it, so kernels never need a bounds check and nothing real is ever overwritten.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

NULL_BLOCK = 0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key and value pages. Donated into every step and returned; never copied."""

    k: tuple[jax.Array, ...]  # L x dtype[K, P, B, H]
    v: tuple[jax.Array, ...]  # L x dtype[K, P, B, H]

    @classmethod
    def create(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               dtype, sharding=None) -> "KVCache":
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(k=tuple(zeros() for _ in range(num_layers)), v=tuple(zeros() for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[1]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc"],
    meta_fields=["decode_only"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each of the step's tokens sits, and where each sequence's context lives in the pages.

    Tokens of one sequence are contiguous: sequence s owns tokens [query_start_loc[s], query_start_loc[s + 1]).
    Padding sequences have no tokens (equal consecutive query_start_loc) and seq_len 0; padding tokens lie after
    query_start_loc[-1], write to the null block and their attention output is unspecified.
    """

    positions: jax.Array  # i32[T]      position of each token within its sequence
    slot_mapping: jax.Array  # i32[T]   block * B + offset where each token's K/V is written
    block_tables: jax.Array  # i32[S, M]  physical blocks of each sequence, in order
    seq_lens: jax.Array  # i32[S]       context length after this step (cached + new tokens)
    query_start_loc: jax.Array  # i32[S + 1]  cumulative new-token counts, starting at 0
    decode_only: bool = False  # static: every sequence brings exactly one token (T == S), selects the decode path
