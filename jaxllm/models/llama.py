"""The Llama decoder family: Llama 1/2/3/3.1, Mistral, Qwen2/2.5, Qwen3 — one implementation, switched by config.

Legend: T tokens, D hidden size, F MLP size, N q-heads, K kv-heads, H head_dim, V vocabulary, L layers.

Why a plain functional model rather than flax.linen: the params are an explicit pytree whose layout *is* the
weight-map's target, so the loader, the dummy initializer, eval_shape and the sharding table all work from
`param_shapes()` without tracing an `init`; the forward is a pure function of (params, kv_cache, inputs), which is
the shape the runner jits with params traced and the cache donated. There is no module state to keep in sync.

Param tree (dtype = the params dtype; "?" = present only when the config says so):
    embed      [V, D]                  final_norm [D]                  lm_head? [D, V]  (absent when tied)
    layers[l]: input_norm [D]  q_proj [D, N*H]  k_proj [D, K*H]  v_proj [D, K*H]  o_proj [N*H, D]
               q_bias?/k_bias?/v_bias? [N*H]/[K*H]/[K*H]  o_bias? [D]  q_norm?/k_norm? [H]
               post_norm [D]  gate_proj [D, F]  up_proj [D, F]  down_proj [F, D]
               gate_bias?/up_bias? [F]  down_bias? [D]
Projections are [in, out] (HF Linear is [out, in]: the weight map transposes), and q/k/v keep heads flattened so a
column split over "tp" is a split over heads.

That is the checkpoint layout the loaders fill. `fuse_params` then turns it into the layout `__call__` runs on
(models/fusion.py, S = tp shards, C = the KV cache's head slots): per layer
    qkv_proj [D, S, (N + 2C) * H / S]  qkv_bias? [S, ...]  gate_up_proj [D, S, 2F / S]  gate_up_bias? [S, ...]
in place of q/k/v and gate/up, so each is one matmul.
"""

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.model_config import ModelConfig
from jaxllm.models.attention import attention
from jaxllm.models.fusion import FusedProjection, fuse_params
from jaxllm.models.layers import add_rms_norm, embed, mlp, rms_norm, rope_cos_sin, rope_inv_freq
from jaxllm.models.weight_map import WeightRule

_LAYER = "model.layers.{i}."

WEIGHT_MAP: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", ("embed",)),
    WeightRule("model.norm.weight", ("final_norm",)),
    WeightRule("lm_head.weight", ("lm_head",), transpose=True, skip_if_absent=True),
    WeightRule(_LAYER + "input_layernorm.weight", ("layers.{i}.input_norm",)),
    WeightRule(_LAYER + "post_attention_layernorm.weight", ("layers.{i}.post_norm",)),
    WeightRule(_LAYER + "self_attn.q_proj.weight", ("layers.{i}.q_proj",), transpose=True),
    WeightRule(_LAYER + "self_attn.k_proj.weight", ("layers.{i}.k_proj",), transpose=True),
    WeightRule(_LAYER + "self_attn.v_proj.weight", ("layers.{i}.v_proj",), transpose=True),
    WeightRule(_LAYER + "self_attn.qkv_proj.weight", ("layers.{i}.q_proj", "layers.{i}.k_proj", "layers.{i}.v_proj"),
               transpose=True),
    WeightRule(_LAYER + "self_attn.q_proj.bias", ("layers.{i}.q_bias",)),
    WeightRule(_LAYER + "self_attn.k_proj.bias", ("layers.{i}.k_bias",)),
    WeightRule(_LAYER + "self_attn.v_proj.bias", ("layers.{i}.v_bias",)),
    WeightRule(_LAYER + "self_attn.qkv_proj.bias", ("layers.{i}.q_bias", "layers.{i}.k_bias", "layers.{i}.v_bias")),
    WeightRule(_LAYER + "self_attn.o_proj.weight", ("layers.{i}.o_proj",), transpose=True),
    WeightRule(_LAYER + "self_attn.o_proj.bias", ("layers.{i}.o_bias",)),
    WeightRule(_LAYER + "self_attn.q_norm.weight", ("layers.{i}.q_norm",)),
    WeightRule(_LAYER + "self_attn.k_norm.weight", ("layers.{i}.k_norm",)),
    WeightRule(_LAYER + "mlp.gate_proj.weight", ("layers.{i}.gate_proj",), transpose=True),
    WeightRule(_LAYER + "mlp.up_proj.weight", ("layers.{i}.up_proj",), transpose=True),
    WeightRule(_LAYER + "mlp.gate_up_proj.weight", ("layers.{i}.gate_proj", "layers.{i}.up_proj"), transpose=True),
    WeightRule(_LAYER + "mlp.down_proj.weight", ("layers.{i}.down_proj",), transpose=True),
    WeightRule(_LAYER + "mlp.gate_proj.bias", ("layers.{i}.gate_bias",)),
    WeightRule(_LAYER + "mlp.up_proj.bias", ("layers.{i}.up_bias",)),
    WeightRule(_LAYER + "mlp.gate_up_proj.bias", ("layers.{i}.gate_bias", "layers.{i}.up_bias")),
    WeightRule(_LAYER + "mlp.down_proj.bias", ("layers.{i}.down_bias",)),
)

FUSED_PROJECTIONS: tuple[FusedProjection, ...] = (
    FusedProjection("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    FusedProjection("qkv_bias", ("q_bias", "k_bias", "v_bias")),
    FusedProjection("gate_up_proj", ("gate_proj", "up_proj")),
    FusedProjection("gate_up_bias", ("gate_bias", "up_bias")),
)

# Buffers some checkpoints carry that are derived, not learned: we recompute the rotary frequencies.
IGNORED: tuple[str, ...] = (_LAYER + "self_attn.rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class LlamaForCausalLM:
    """`kv_cache, logits = model(params, kv_cache, token_ids, metadata, logits_indices=None)`.

    Frozen and hashable, so a runner can close over it or pass it as a static jit argument.
    """

    config: ModelConfig
    mesh: Mesh | None = None  # where the params live; attention runs under shard_map over its "tp" axis
    kernel_backend: str = "auto"  # pallas_kernels backend: "auto" (from the device) | "reference" | "triton"

    weight_map: ClassVar[tuple[WeightRule, ...]] = WEIGHT_MAP
    ignored_weights: ClassVar[tuple[str, ...]] = IGNORED
    fused_projections: ClassVar[tuple[FusedProjection, ...]] = FUSED_PROJECTIONS

    def param_shapes(self, dtype) -> dict:
        """The param tree as jax.ShapeDtypeStruct leaves: what the loaders fill and the sharding table covers."""
        c = self.config
        d, f, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size

        def s(*shape):
            return jax.ShapeDtypeStruct(shape, dtype)

        def layer():
            p = {"input_norm": s(d), "q_proj": s(d, q), "k_proj": s(d, kv), "v_proj": s(d, kv), "o_proj": s(q, d),
                 "post_norm": s(d), "gate_proj": s(d, f), "up_proj": s(d, f), "down_proj": s(f, d)}
            if c.attention_bias:
                p |= {"q_bias": s(q), "k_bias": s(kv), "v_bias": s(kv)}
            if c.o_proj_bias:
                p["o_bias"] = s(d)
            if c.qk_norm:
                p |= {"q_norm": s(c.head_dim), "k_norm": s(c.head_dim)}
            if c.mlp_bias:
                p |= {"gate_bias": s(f), "up_bias": s(f), "down_bias": s(d)}
            return p

        params = {"embed": s(c.vocab_size, d), "layers": [layer() for _ in range(c.num_layers)], "final_norm": s(d)}
        if not c.tie_word_embeddings:
            params["lm_head"] = s(d, c.vocab_size)
        return params

    @functools.partial(jax.jit, static_argnames=("self", "sliding_window"))
    def _decoder_layer(self, sliding_window: int | None, p: dict, k_pages: jax.Array, v_pages: jax.Array,
                       x: jax.Array, normed: jax.Array, next_norm: jax.Array, cos: jax.Array, sin: jax.Array,
                       metadata: AttentionMetadata):
        """One decoder layer -> (k_pages', v_pages', x', normed'): `normed` is `x` normed for this layer, `normed'`
        is `x'` normed with `next_norm`.

        Jitted (the model is static: frozen and hashable), so that a step's layers, alike in shapes, are traced and
        lowered once: the model step lowers one layer and calls it L times (XLA inlines the calls, so the compiled
        program is the same). Traced inline, every layer lowered its own Pallas kernels, and a warm start, whose
        compile cache skips only XLA's part, paid that for every bucket
        (docs/perf-notes.md#one-decoder-layer-lowered-per-bucket).
        """
        k_pages, v_pages, h = attention(
            p, k_pages, v_pages, normed, cos, sin, metadata, config=self.config, sliding_window=sliding_window,
            backend=self.kernel_backend, mesh=self.mesh)
        x, normed = self._add_norm(x, h, p["post_norm"])
        x, normed = self._add_norm(x, mlp(p, normed), next_norm)
        return k_pages, v_pages, x, normed

    def _add_norm(self, x: jax.Array, h: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
        return add_rms_norm(x, h, weight, self.config.rms_norm_eps, backend=self.kernel_backend, mesh=self.mesh)

    def fuse_params(self, params: dict) -> dict:
        """Checkpoint layout (`param_shapes`, as loaded) -> the fused layout `__call__` runs on. Consumes `params`."""
        return fuse_params(params, self.fused_projections, self.config, self.mesh)

    def __call__(
        self,
        params: dict,
        kv_cache: KVCache,
        token_ids: jax.Array,  # i32[T]
        metadata: AttentionMetadata,
        logits_indices: jax.Array | None = None,  # i32[S] rows of T to project to the vocabulary
    ) -> tuple[KVCache, jax.Array]:  # kv_cache', f32[S or T, V]
        c = self.config
        if kv_cache.num_layers != c.num_layers:
            raise ValueError(f"kv_cache has {kv_cache.num_layers} layers, model has {c.num_layers}")
        x = embed(params["embed"], token_ids, self.mesh)  # [T, D]: the residual stream
        cos, sin = rope_cos_sin(metadata.positions, rope_inv_freq(c), x.dtype)  # [T, R]
        layers = params["layers"]
        # Each sublayer's output is added to the stream and the sum normed for the next sublayer (the next layer's
        # input norm, after the last layer the final norm) in one step: add_rms_norm.
        next_norms = [p["input_norm"] for p in layers[1:]] + [params["final_norm"]]
        normed = rms_norm(x, layers[0]["input_norm"], c.rms_norm_eps)
        new_k, new_v = [], []
        for i, (p, next_norm) in enumerate(zip(layers, next_norms)):
            k_pages, v_pages, x, normed = self._decoder_layer(
                c.layer_sliding_window(i), p, kv_cache.k[i], kv_cache.v[i], x, normed, next_norm, cos, sin, metadata)
            new_k.append(k_pages)
            new_v.append(v_pages)
        x = normed  # final-normed
        if logits_indices is not None:
            x = x[logits_indices]  # [S, D]: project only the rows that will be sampled
        if c.tie_word_embeddings:
            logits = jnp.einsum("TD,VD->TV", x, params["embed"])
        else:
            logits = jnp.einsum("TD,DV->TV", x, params["lm_head"])
        return KVCache(k=tuple(new_k), v=tuple(new_v)), logits.astype(jnp.float32)

