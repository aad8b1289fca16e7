"""Self-attention as an nnx module: project, (q/k-norm), rotate, attend, project out — over the paged KV cache for
the engine (`__call__`), or over whole sequences for the dense forward (`dense`), with the same params and code
up to the attention itself.

Legend: T tokens, D hidden size, N q-heads, K kv-heads, H head_dim, R = H // 2, P pages, B tokens per page,
C the KV cache's head slots (K, or tp when K < tp and kv-heads are replicated: see jaxllm.sharding), S tp shards of
the fused q/k/v projection (models/fusion.py).

The kernel work (rotating q and k and writing the pages, the ragged attention) is `pallas_kernels`' public entry;
this module only prepares its inputs, so the GPU backends plug in through `backend` without touching the model.
Under tensor parallelism (a mesh whose "tp" axis has more than one device) the kernels run under shard_map over
heads: device d gets q-heads [d*N/tp, (d+1)*N/tp) and cache head slots [d*C/tp, (d+1)*C/tp), which hold exactly the
kv-heads those q-heads use.
"""

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

import pallas_kernels
from jaxllm import sharding
from jaxllm.kv_cache import AttentionMetadata
from jaxllm.model_config import ModelConfig
from jaxllm.models.dense_attention import causal_attention
from jaxllm.models.fusion import fused_shape, kv_repeats
from jaxllm.models.modules import RMSNorm, project, projection, zeros_param
from pallas_kernels.rotary_kv_reference import apply_rotary

if TYPE_CHECKING:
    from jaxllm.quantization.linear_quant import LinearQuant


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, sliding_window: int | None, dtype, mesh: Mesh | None,
                 kernel_backend: str, quants: "dict[str, LinearQuant]"):
        """`quants`: how "attn.q_proj" (and so k/v: one fusion) and "attn.o_proj" are stored; absent: dense."""
        c = config
        tp = sharding.tp_size(mesh)
        shape = fused_shape((c.q_size, c.kv_size, c.kv_size), ("q_proj", "k_proj", "v_proj"), (c.hidden_size,),
                            tp=tp, kv_repeats=kv_repeats(c, tp))
        where = dict(dtype=dtype, mesh=mesh, kernel_backend=kernel_backend)
        self.qkv_proj = projection(quants.get("attn.q_proj"), c.hidden_size, shape[1:], parallel="column",
                                   **where)  # [D, S, (N + 2C) * H / S]
        self.qkv_bias = zeros_param(shape[1:], dtype) if c.attention_bias else None  # [S, (N + 2C) * H / S]
        self.o_proj = projection(quants.get("attn.o_proj"), c.q_size, (c.hidden_size,), parallel="row",
                                 **where)  # [N*H, D]
        self.o_bias = zeros_param((c.hidden_size,), dtype) if c.o_proj_bias else None  # [D]
        # Qwen3 normalizes each q and k head before the rotation so the attention logits stay bounded.
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.num_q_heads, self.head_dim = c.num_q_heads, c.head_dim
        self.sliding_window, self.kernel_backend, self.mesh = sliding_window, kernel_backend, mesh

    def __call__(
        self,
        k_pages: jax.Array,  # [C, P, B, H]
        v_pages: jax.Array,  # [C, P, B, H]
        x: jax.Array,  # [T, D], already normed
        cos: jax.Array,  # [T, R]
        sin: jax.Array,  # [T, R]
        metadata: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:  # k_pages', v_pages', out [T, D]
        num_tokens = x.shape[0]
        n, h, backend = self.num_q_heads, self.head_dim, self.kernel_backend
        qkv = self._qkv(x)  # [T, S, W]
        knobs = dict(scale=h ** -0.5, sliding_window=self.sliding_window, decode_only=metadata.decode_only,
                     backend=backend)
        if sharding.tp_size(self.mesh) == 1:
            q, k_pages, v_pages = pallas_kernels.rotary_write_kv(
                qkv.reshape(num_tokens, -1), cos, sin, k_pages, v_pages, metadata.slot_mapping, num_q_heads=n,
                backend=backend)
            out = pallas_kernels.ragged_paged_attention(
                q, k_pages, v_pages, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, **knobs)
        else:
            k_pages, v_pages, out = _attend_sharded(qkv, cos, sin, k_pages, v_pages, metadata, self.mesh, n, knobs)
        return k_pages, v_pages, self._out(out.reshape(num_tokens, n * h))

    def dense(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Causal attention within each sequence, no cache: x [B, T, D] (normed), cos and sin [T, R] -> [B, T, D]."""
        b, t, _ = x.shape
        n, h = self.num_q_heads, self.head_dim
        qkv = self._qkv(x.reshape(b * t, -1), kernel=False)  # [B*T, S, W]
        heads = qkv.reshape(*qkv.shape[:2], -1, h)  # per shard: its q-heads, its k slots, its v slots
        q_heads = n // heads.shape[1]
        slots = (heads.shape[2] - q_heads) // 2
        cos, sin = jnp.tile(cos, (b, 1)), jnp.tile(sin, (b, 1))  # [B*T, R]
        q = apply_rotary(heads[:, :, :q_heads].reshape(b * t, n, h), cos, sin)
        k = apply_rotary(heads[:, :, q_heads:q_heads + slots].reshape(b * t, -1, h), cos, sin)
        v = heads[:, :, q_heads + slots:].reshape(b * t, -1, h)
        out = causal_attention(q.reshape(b, t, n, h), k.reshape(b, t, -1, h), v.reshape(b, t, -1, h),
                               scale=h ** -0.5, sliding_window=self.sliding_window)
        return self._out(out.reshape(b * t, n * h), kernel=False).reshape(b, t, -1)

    def _qkv(self, x: jax.Array, *, kernel: bool = True) -> jax.Array:  # [T, D] -> [T, S, W]
        qkv = project(x, self.qkv_proj, self.qkv_bias, kernel=kernel)
        return qkv if self.q_norm is None else self._norm_qk(qkv)

    def _out(self, attended: jax.Array, *, kernel: bool = True) -> jax.Array:  # [T, N*H] -> [T, D]
        return project(attended, self.o_proj, self.o_bias, kernel=kernel)

    def _norm_qk(self, qkv: jax.Array) -> jax.Array:
        """Each q and k head normed; qkv [T, S, W] keeps its fused layout (per shard: q heads, k heads, v heads)."""
        tokens, shards, width = qkv.shape
        heads = qkv.reshape(tokens, shards, -1, self.head_dim)
        q_heads = self.num_q_heads // shards
        kv_heads = (heads.shape[2] - q_heads) // 2
        q = self.q_norm(heads[:, :, :q_heads])
        key = self.k_norm(heads[:, :, q_heads:q_heads + kv_heads])
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
