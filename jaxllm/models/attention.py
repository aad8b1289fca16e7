"""Self-attention over the paged KV cache: project, (q/k-norm), rotate and write the new K/V, attend, project out.

Legend: T tokens, D hidden size, N q-heads, K kv-heads, H head_dim, R = H // 2, P pages, B tokens per page,
C the KV cache's head slots (K, or tp when K < tp and kv-heads are replicated: see jaxllm.sharding).

The kernel work (rotating q and k and writing the pages, the ragged attention) is `pallas_kernels`' public entry;
this module only prepares its inputs, so the GPU backends plug in through `backend` without touching the model.
Under tensor parallelism (a mesh whose "tp" axis has more than one device) the kernels run under shard_map over
heads: device d gets q-heads [d*N/tp, (d+1)*N/tp) and cache head slots [d*C/tp, (d+1)*C/tp), which hold exactly the
kv-heads those q-heads use.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import pallas_kernels
from jaxllm import sharding
from jaxllm.kv_cache import AttentionMetadata
from jaxllm.model_config import ModelConfig
from jaxllm.models.layers import fused_linear, linear, rms_norm


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
    qkv = fused_linear(x, p["qkv_proj"], p.get("qkv_bias"))  # [T, S, W]: S shards of (q, k, v) heads
    if config.qk_norm:
        qkv = _norm_qk(qkv, p, config)
    knobs = dict(scale=h ** -0.5, sliding_window=sliding_window, decode_only=metadata.decode_only, backend=backend)
    if sharding.tp_size(mesh) == 1:
        q, k_pages, v_pages = pallas_kernels.rotary_write_kv(
            qkv.reshape(num_tokens, -1), cos, sin, k_pages, v_pages, metadata.slot_mapping, num_q_heads=n,
            backend=backend)
        out = pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, **knobs)
    else:
        k_pages, v_pages, out = _attend_sharded(qkv, cos, sin, k_pages, v_pages, metadata, mesh, n, knobs)
    return k_pages, v_pages, linear(out.reshape(num_tokens, n * h), p["o_proj"], p.get("o_bias"))


def _norm_qk(qkv: jax.Array, p: dict, config: ModelConfig) -> jax.Array:
    """Qwen3 normalizes each q and k head before the rotation so the attention logits stay bounded; qkv [T, S, W]
    keeps its fused layout (per shard: q heads, k heads, v heads)."""
    tokens, shards, width = qkv.shape
    heads = qkv.reshape(tokens, shards, -1, config.head_dim)
    q_heads = config.num_q_heads // shards
    kv_heads = (heads.shape[2] - q_heads) // 2
    q = rms_norm(heads[:, :, :q_heads], p["q_norm"], config.rms_norm_eps)
    key = rms_norm(heads[:, :, q_heads:q_heads + kv_heads], p["k_norm"], config.rms_norm_eps)
    return jnp.concatenate([q, key, heads[:, :, q_heads + kv_heads:]], axis=2).reshape(tokens, shards, width)


def _attend_sharded(qkv, cos, sin, k_pages, v_pages, metadata: AttentionMetadata, mesh: Mesh, num_q_heads: int,
                    knobs: dict):
    """Rotary + KV write, then ragged attention, with heads split over the mesh's "tp" axis; no collective inside."""
    _, shards, width = qkv.shape
    head_slots = (shards * width // k_pages.shape[3] - num_q_heads) // 2
    if k_pages.shape[0] != head_slots:
        raise ValueError(f"the KV cache has {k_pages.shape[0]} head slots; the params were fused for "
                         f"{head_slots} (sharding.kv_cache_heads for this model and tensor_parallel_size)")
    q, k_pages, v_pages = pallas_kernels.rotary_write_kv_sharded(
        qkv, cos, sin, k_pages, v_pages, metadata.slot_mapping, num_q_heads=num_q_heads, mesh=mesh,
        axis=sharding.TP, backend=knobs["backend"])
    out = pallas_kernels.ragged_paged_attention_sharded(
        q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        mesh=mesh, axis=sharding.TP, **knobs)  # [T, N, H], N split over tp
    return k_pages, v_pages, out
