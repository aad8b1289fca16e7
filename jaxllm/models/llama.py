"""The Llama decoder family: Llama 1/2/3/3.1, Mistral, Qwen2/2.5, Qwen3 — one implementation, switched by config.

Legend: B sequences, T tokens, D hidden size, F MLP size, N q-heads, K kv-heads, H head_dim, V vocabulary,
L layers, S tp shards of a fused projection, C the KV cache's head slots.

Why flax.nnx modules: a researcher opens, prints, differentiates and edits the model as JAX users expect
(`llm.model`), while `nnx.split` still gives the engine what it jits: a pure function of (state, kv_cache, inputs)
with the state traced and the cache donated. The module is built abstract (`nnx.eval_shape`) and a loader fills
its state (models/state.py); the weight map and checkpoint layout are data (models/llama_weights.py).

Two forwards share every param and the norm/rotary code: `step` (the engine's, over the paged KV cache, the Pallas
kernels and the fused add-norms) and `__call__` (`model(ids)`: a plain causal forward of [B, T] ids, pure jnp, no
cache, differentiable).

State (dotted paths; "?" = present only when the config says so):
    embed.weight [V, D]            final_norm.weight [D]           lm_head.weight? [D, V]  (absent when tied)
    layers.{l}.: input_norm.weight [D]  post_norm.weight [D]
        attn.qkv_proj [D, S, (N + 2C) * H / S]  attn.qkv_bias? [S, ...]  attn.o_proj [N*H, D]  attn.o_bias? [D]
        attn.q_norm.weight?/k_norm.weight? [H]
        mlp.gate_up_proj [D, S, 2F / S]  mlp.gate_up_bias? [S, ...]  mlp.down_proj [F, D]  mlp.down_bias? [D]
q/k/v and gate/up are fused (models/fusion.py), so each is one matmul; the loaders fill the separate checkpoint
layout and fuse it before the state is filled. In a quantized model a projection is a module of packed arrays
instead (models/quant_linear.py): attn.qkv_proj.qweight [D / E, S, W], .scales / .zeros [D / G, S, W], ...; so is
an untied head a quantized checkpoint stores packed: lm_head.weight.qweight [D / E, V], ...
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.model_config import ModelConfig
from jaxllm.models import llama_weights
from jaxllm.models.decoder_layer import DecoderLayer, decoder_layer_step
from jaxllm.models.fusion import FusedProjection
from jaxllm.models.layers import rope_cos_sin, rope_inv_freq
from jaxllm.models.modules import Embed, LMHead, RMSNorm
from jaxllm.models.research import ResearchInputs
from jaxllm.models.weight_map import Linear, WeightRule

if TYPE_CHECKING:
    from jaxllm.quantization.linear_quant import LinearQuant


class LlamaForCausalLM(nnx.Module):
    """`logits = model(ids)` (dense, [B, T] -> f32[B, T, V]); `kv_cache, logits = model.step(kv_cache, token_ids,
    metadata, logits_indices=None)` (the engine's paged step)."""

    weight_map: ClassVar[tuple[WeightRule, ...]] = llama_weights.WEIGHT_MAP
    ignored_weights: ClassVar[tuple[str, ...]] = llama_weights.IGNORED
    fused_projections: ClassVar[tuple[FusedProjection, ...]] = llama_weights.FUSED_PROJECTIONS

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, mesh: Mesh | None = None,
                 kernel_backend: str = "auto", quants: "Mapping[str, LinearQuant] | None" = None,
                 quantization: str | None = None):
        """`mesh`: where the params live (attention runs under shard_map over its "tp" axis); `kernel_backend`:
        pallas_kernels' backend for `step` ("auto" from the device, "reference", "xla", "triton"); `quants`: the
        linears stored quantized, by checkpoint-layout path ("layers.3.attn.q_proj"; parts of a fusion alike),
        the others dense; `quantization`: the format's name, for what the engine reports."""
        c = config
        self.config, self.dtype, self.mesh, self.kernel_backend = c, dtype, mesh, kernel_backend
        # A tuple, not a dict: the module's static attributes are part of its (hashed) graph.
        self.quants = tuple(sorted((quants or {}).items()))
        self.quantization = quantization if self.quants else None
        self.embed = Embed(c.vocab_size, c.hidden_size, dtype, mesh)
        self.layers = nnx.List([
            DecoderLayer(c, sliding_window=c.layer_sliding_window(i), dtype=dtype, mesh=mesh,
                         kernel_backend=kernel_backend, quants=_layer_quants(quants or {}, i))
            for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head = None if c.tie_word_embeddings else LMHead(
            c.hidden_size, c.vocab_size, quant=(quants or {}).get(llama_weights.HEAD), dtype=dtype, mesh=mesh,
            kernel_backend=kernel_backend)

    def checkpoint_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The checkpoint layout the loaders fill (models/llama_weights.py), in the model's dtype; quantized linears
        as their arrays."""
        return llama_weights.checkpoint_shapes(self.config, self.dtype, dict(self.quants))

    @staticmethod
    def linears(config: ModelConfig) -> dict[str, Linear]:
        """{checkpoint-layout path: (HF module, K, N)} of the linears a quantized checkpoint may store packed."""
        return llama_weights.linears(config)

    @staticmethod
    def head(config: ModelConfig) -> tuple[str, Linear]:
        """The vocabulary head's checkpoint-layout path and linear, tied or not (a tied one is not in `linears`)."""
        return llama_weights.HEAD, llama_weights.head(config)

    def __call__(self, ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 return_hidden_states: bool = False):
        """ids i32[B, T] (or inputs_embeds [B, T, D], HF's name: e.g. `model.embed(ids)` for attribution) -> logits
        f32[B, T, V]: every sequence from position 0, causal, no cache. With return_hidden_states, (logits,
        f32[L + 1, B, T, D]) indexed like HF's output_hidden_states (0 the embeddings, l after decoder layer l, L
        after the final norm).

        Right-padded batches need no mask: a causal position never sees the padding after it, so the logits of
        the real tokens are exact (those of the padding are garbage). Left padding is not supported."""
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of ids and inputs_embeds")
        x = self.embed(ids.reshape(-1)).reshape(*ids.shape, -1) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape  # x [B, T, D]: the residual stream
        cos, sin = rope_cos_sin(jnp.arange(t), rope_inv_freq(self.config), x.dtype)  # [T, R]
        streams = [x]
        for layer in self.layers:
            x = layer.dense(x, cos, sin)
            streams.append(x)
        normed = self.final_norm(x)
        logits = self._logits(normed.reshape(b * t, -1), kernel=False).reshape(b, t, -1)
        if not return_hidden_states:
            return logits
        return logits, jnp.stack(streams[:-1] + [normed]).astype(jnp.float32)

    def step(
        self,
        kv_cache: KVCache,
        token_ids: jax.Array,  # i32[T]
        metadata: AttentionMetadata,
        logits_indices: jax.Array | None = None,  # i32[S] rows of T to project to the vocabulary
        research: ResearchInputs | None = None,
    ):
        """-> (kv_cache', f32[S or T, V] logits), and with `research` a third entry: the gathered hidden states
        f32[K, R, D] (None when no row asks for them)."""
        c = self.config
        if kv_cache.num_layers != c.num_layers:
            raise ValueError(f"kv_cache has {kv_cache.num_layers} layers, model has {c.num_layers}")
        x = self.embed(token_ids)  # [T, D]: the residual stream
        cos, sin = rope_cos_sin(metadata.positions, rope_inv_freq(c), x.dtype)  # [T, R]
        # Each sublayer's output is added to the stream and the sum normed for the next sublayer (the next layer's
        # input norm, after the last layer the final norm) in one step: add_rms_norm.
        next_norms = [layer.input_norm.weight[...] for layer in self.layers[1:]] + [self.final_norm.weight[...]]
        normed = self.layers[0].input_norm(x)
        streams = {0: x}
        new_k, new_v = [], []
        for i, (layer, next_norm) in enumerate(zip(self.layers, next_norms)):
            steer = None if research is None else research.steering(i + 1, x.dtype)
            k_pages, v_pages, x, normed = decoder_layer_step(
                layer, kv_cache.k[i], kv_cache.v[i], x, normed, next_norm, cos, sin, metadata, steer)
            new_k.append(k_pages)
            new_v.append(v_pages)
            streams[i + 1] = x
        streams[c.num_layers] = normed  # HF's last entry is after the final norm, in place of layer L's output
        x = normed  # final-normed
        if logits_indices is not None:
            x = x[logits_indices]  # [S, D]: project only the rows that will be sampled
        kv_cache = KVCache(k=tuple(new_k), v=tuple(new_v))
        if research is None:
            return kv_cache, self._logits(x)
        return kv_cache, self._logits(x), research.gather(streams)

    def _logits(self, x: jax.Array, *, kernel: bool = True) -> jax.Array:  # [T, D] -> f32[T, V]
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x, kernel=kernel)
        return logits.astype(jnp.float32)


def _layer_quants(quants: "Mapping[str, LinearQuant]", layer: int) -> "dict[str, LinearQuant]":
    prefix = f"layers.{layer}."
    return {path[len(prefix):]: quant for path, quant in quants.items() if path.startswith(prefix)}
