"""Self-attention over the paged KV cache: project, (q/k-norm), rotate, write the new K/V, attend, project out.

Legend: T tokens, D hidden size, N q-heads, K kv-heads, H head_dim, R = H // 2, P pages, B tokens per page.

The kernel work (writing pages, the ragged attention) is `pallas_kernels`' public entry; this module only prepares
its inputs, so the GPU backends plug in through `backend` without touching the model.
"""

import jax

import pallas_kernels
from jaxllm.kv_cache import AttentionMetadata
from jaxllm.model_config import ModelConfig
from jaxllm.models.layers import apply_rotary, linear, rms_norm


def attention(
    p: dict,  # one layer's params
    k_pages: jax.Array,  # [K, P, B, H]
    v_pages: jax.Array,  # [K, P, B, H]
    x: jax.Array,  # [T, D], already normed
    cos: jax.Array,  # [T, R]
    sin: jax.Array,  # [T, R]
    metadata: AttentionMetadata,
    *,
    config: ModelConfig,
    sliding_window: int | None,
    backend: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # k_pages', v_pages', out [T, D]
    num_tokens = x.shape[0]
    n, k, h = config.num_q_heads, config.num_kv_heads, config.head_dim
    q = linear(x, p["q_proj"], p.get("q_bias")).reshape(num_tokens, n, h)  # [T, N, H]
    key = linear(x, p["k_proj"], p.get("k_bias")).reshape(num_tokens, k, h)  # [T, K, H]
    value = linear(x, p["v_proj"], p.get("v_bias")).reshape(num_tokens, k, h)  # [T, K, H]
    if config.qk_norm:
        # Qwen3 normalizes each head before the rotation so the attention logits stay bounded.
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        key = rms_norm(key, p["k_norm"], config.rms_norm_eps)
    q = apply_rotary(q, cos, sin)
    key = apply_rotary(key, cos, sin)
    k_pages, v_pages = pallas_kernels.write_kv(k_pages, v_pages, key, value, metadata.slot_mapping)
    out = pallas_kernels.ragged_paged_attention(
        q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
        scale=h ** -0.5, sliding_window=sliding_window, decode_only=metadata.decode_only, backend=backend,
    )  # [T, N, H]
    return k_pages, v_pages, linear(out.reshape(num_tokens, n * h), p["o_proj"], p.get("o_bias"))
