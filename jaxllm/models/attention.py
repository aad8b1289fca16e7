"""Self-attention over the paged KV cache: project, (q/k-norm), rotate, write the new K/V, attend, project out.

Legend: T tokens, D hidden size, N q-heads, K kv-heads, H head_dim, R = H // 2, P pages, B tokens per page,
C the KV cache's head slots (K, or tp when K < tp and kv-heads are replicated: see jaxllm.sharding).

The kernel work (writing pages, the ragged attention) is `pallas_kernels`' public entry; this module only prepares
its inputs, so the GPU backends plug in through `backend` without touching the model. Under tensor parallelism
(a mesh whose "tp" axis has more than one device) the kernels run under shard_map over heads: device d gets q-heads
[d*N/tp, (d+1)*N/tp) and cache head slots [d*C/tp, (d+1)*C/tp), which hold exactly the kv-heads those q-heads use.
"""

import jax
from jax.sharding import Mesh

import pallas_kernels
from jaxllm import sharding
from jaxllm.kv_cache import AttentionMetadata
from jaxllm.model_config import ModelConfig
from jaxllm.models.fusion import split_fused
from jaxllm.models.layers import apply_rotary, fused_linear, linear, rms_norm


def attention(
    p: dict,  # one layer's params
    k_pages: jax.Array,  # [C, P, B, H]
    v_pages: jax.Array,  # [C, P, B, H]
    x: jax.Array,  # [T, D], already normed
    cos: jax.Array,  # [T, R]
    sin: jax.Array,  # [T, R]
    metadata: AttentionMetadata,
    *,
    config: ModelConfig,
    sliding_window: int | None,
    backend: str,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # k_pages', v_pages', out [T, D]
    num_tokens = x.shape[0]
    n, h = config.num_q_heads, config.head_dim
    qkv = fused_linear(x, p["qkv_proj"], p.get("qkv_bias"))  # [T, S, W]: S shards of (q, k, v) columns
    shards, width = qkv.shape[1:]
    q_width = n * h // shards
    q, key, value = split_fused(qkv, (q_width, (width - q_width) // 2, (width - q_width) // 2))
    q = q.reshape(num_tokens, n, h)  # [T, N, H]
    key = key.reshape(num_tokens, -1, h)  # [T, C, H]
    value = value.reshape(num_tokens, -1, h)  # [T, C, H]
    if config.qk_norm:
        # Qwen3 normalizes each head before the rotation so the attention logits stay bounded.
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        key = rms_norm(key, p["k_norm"], config.rms_norm_eps)
    q = apply_rotary(q, cos, sin)
    key = apply_rotary(key, cos, sin)
    knobs = dict(scale=h ** -0.5, sliding_window=sliding_window, decode_only=metadata.decode_only, backend=backend)
    if sharding.tp_size(mesh) == 1:
        k_pages, v_pages = pallas_kernels.write_kv(k_pages, v_pages, key, value, metadata.slot_mapping)
        out = pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, **knobs)
    else:
        k_pages, v_pages, out = _attend_sharded(q, key, value, k_pages, v_pages, metadata, mesh, knobs)
    return k_pages, v_pages, linear(out.reshape(num_tokens, n * h), p["o_proj"], p.get("o_bias"))


def _attend_sharded(q, key, value, k_pages, v_pages, metadata: AttentionMetadata, mesh: Mesh, knobs: dict):
    """write_kv + ragged attention with heads split over the mesh's "tp" axis; no collective inside."""
    if k_pages.shape[0] != key.shape[1]:
        raise ValueError(f"the KV cache has {k_pages.shape[0]} head slots; the params were fused for "
                         f"{key.shape[1]} (sharding.kv_cache_heads for this model and tensor_parallel_size)")
    k_pages, v_pages = pallas_kernels.write_kv_sharded(k_pages, v_pages, key, value, metadata.slot_mapping,
                                                       mesh=mesh, axis=sharding.TP)
    out = pallas_kernels.ragged_paged_attention_sharded(
        q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        mesh=mesh, axis=sharding.TP, **knobs)  # [T, N, H], N split over tp
    return k_pages, v_pages, out
