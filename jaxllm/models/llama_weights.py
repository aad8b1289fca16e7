"""The Llama family's weights as data: the HF name map, the fused projections, and the checkpoint layout the
loaders fill (`checkpoint_shapes`).

Paths are the model's dotted state paths (models/llama.py), "{i}" a layer index. The checkpoint layout differs from
the state only inside a layer: q/k/v and gate/up are separate params there, fused into the state's qkv_proj and
gate_up_proj after loading (models/fusion.py), so they exist only while loading.

Checkpoint layout (dtype = the params dtype; "?" = present only when the config says so):
    embed.weight [V, D]         final_norm.weight [D]        lm_head.weight? [D, V]  (absent when tied)
    layers.{i}.: input_norm.weight [D]  post_norm.weight [D]
        attn.q_proj [D, N*H]  attn.k_proj [D, K*H]  attn.v_proj [D, K*H]  attn.o_proj [N*H, D]
        attn.q_bias?/k_bias?/v_bias? [N*H]/[K*H]/[K*H]  attn.o_bias? [D]  attn.q_norm.weight?/k_norm.weight? [H]
        mlp.gate_proj [D, F]  mlp.up_proj [D, F]  mlp.down_proj [F, D]  mlp.gate_bias?/up_bias? [F]  mlp.down_bias? [D]
Projections are [in, out] (HF Linear is [out, in]: the weight map transposes), and q/k/v keep heads flattened so a
column split over "tp" is a split over heads. A projection a quantized checkpoint stores packed is, in place of its
one param, its arrays (models/quant_linear.py): "layers.{i}.attn.q_proj.qweight", ".scales", ".zeros" (".perm");
an untied head stored packed is "lm_head.weight.qweight", ... (a tied head is the embedding: always dense).
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax

from jaxllm.model_config import ModelConfig
from jaxllm.models.fusion import FusedProjection
from jaxllm.models.quant_linear import quant_shapes
from jaxllm.models.weight_map import Linear, WeightRule

if TYPE_CHECKING:
    from jaxllm.quantization.linear_quant import LinearQuant

_HF = "model.layers.{i}."
_L = "layers.{i}."
_ATTN, _MLP = _L + "attn.", _L + "mlp."

WEIGHT_MAP: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", ("embed.weight",)),
    WeightRule("model.norm.weight", ("final_norm.weight",)),
    WeightRule("lm_head.weight", ("lm_head.weight",), transpose=True, skip_if_absent=True),
    WeightRule(_HF + "input_layernorm.weight", (_L + "input_norm.weight",)),
    WeightRule(_HF + "post_attention_layernorm.weight", (_L + "post_norm.weight",)),
    WeightRule(_HF + "self_attn.q_proj.weight", (_ATTN + "q_proj",), transpose=True),
    WeightRule(_HF + "self_attn.k_proj.weight", (_ATTN + "k_proj",), transpose=True),
    WeightRule(_HF + "self_attn.v_proj.weight", (_ATTN + "v_proj",), transpose=True),
    WeightRule(_HF + "self_attn.qkv_proj.weight", (_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj"),
               transpose=True),
    WeightRule(_HF + "self_attn.q_proj.bias", (_ATTN + "q_bias",)),
    WeightRule(_HF + "self_attn.k_proj.bias", (_ATTN + "k_bias",)),
    WeightRule(_HF + "self_attn.v_proj.bias", (_ATTN + "v_bias",)),
    WeightRule(_HF + "self_attn.qkv_proj.bias", (_ATTN + "q_bias", _ATTN + "k_bias", _ATTN + "v_bias")),
    WeightRule(_HF + "self_attn.o_proj.weight", (_ATTN + "o_proj",), transpose=True),
    WeightRule(_HF + "self_attn.o_proj.bias", (_ATTN + "o_bias",)),
    WeightRule(_HF + "self_attn.q_norm.weight", (_ATTN + "q_norm.weight",)),
    WeightRule(_HF + "self_attn.k_norm.weight", (_ATTN + "k_norm.weight",)),
    WeightRule(_HF + "mlp.gate_proj.weight", (_MLP + "gate_proj",), transpose=True),
    WeightRule(_HF + "mlp.up_proj.weight", (_MLP + "up_proj",), transpose=True),
    WeightRule(_HF + "mlp.gate_up_proj.weight", (_MLP + "gate_proj", _MLP + "up_proj"), transpose=True),
    WeightRule(_HF + "mlp.down_proj.weight", (_MLP + "down_proj",), transpose=True),
    WeightRule(_HF + "mlp.gate_proj.bias", (_MLP + "gate_bias",)),
    WeightRule(_HF + "mlp.up_proj.bias", (_MLP + "up_bias",)),
    WeightRule(_HF + "mlp.gate_up_proj.bias", (_MLP + "gate_bias", _MLP + "up_bias")),
    WeightRule(_HF + "mlp.down_proj.bias", (_MLP + "down_bias",)),
)

# Relative to a layer ("layers.{i}." dropped).
FUSED_PROJECTIONS: tuple[FusedProjection, ...] = (
    FusedProjection("attn.qkv_proj", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
    FusedProjection("attn.qkv_bias", ("attn.q_bias", "attn.k_bias", "attn.v_bias")),
    FusedProjection("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    FusedProjection("mlp.gate_up_bias", ("mlp.gate_bias", "mlp.up_bias")),
)

# Buffers some checkpoints carry that are derived, not learned: we recompute the rotary frequencies.
IGNORED: tuple[str, ...] = (_HF + "self_attn.rotary_emb.inv_freq",)


# The decoder's linears (those a quantized checkpoint may store packed, with an untied head; the embedding, a
# gathered table, stays dense): HF module (the name a QuantFormat is asked by) -> checkpoint-layout param,
# layer-relative.
LINEARS: tuple[tuple[str, str], ...] = (
    ("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"), ("self_attn.v_proj", "attn.v_proj"),
    ("self_attn.o_proj", "attn.o_proj"), ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
    ("mlp.down_proj", "mlp.down_proj"),
)


HEAD = "lm_head.weight"  # the head's checkpoint-layout param; its HF module is "lm_head"


def linears(c: ModelConfig) -> dict[str, Linear]:
    """{checkpoint-layout path: (HF module, K in, N out)} of every decoder linear and the untied head, in state
    order."""
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    features = {"attn.q_proj": (d, q), "attn.k_proj": (d, kv), "attn.v_proj": (d, kv), "attn.o_proj": (q, d),
                "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    out = {f"layers.{i}.{param}": Linear(f"model.layers.{i}.{module}", *features[param])
           for i in range(c.num_layers) for module, param in LINEARS}
    return out if c.tie_word_embeddings else out | {HEAD: head(c)}


def head(c: ModelConfig) -> Linear:
    """The vocabulary head as a linear [D -> V], whether or not it is tied to the embedding."""
    return Linear("lm_head", c.hidden_size, c.vocab_size)


def checkpoint_shapes(c: ModelConfig, dtype,
                      quants: "Mapping[str, LinearQuant] | None" = None) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted path: shape} of the checkpoint layout, in state order (embed, layers, final_norm, lm_head); each
    linear of `quants` (checkpoint-layout path -> how it is stored) as its arrays instead of its dense weight."""
    shapes = _dense_shapes(c, dtype)
    if not quants:
        return shapes
    out = {}
    for path, shape in shapes.items():
        if path not in quants:
            out[path] = shape
            continue
        k, n = shape.shape
        out |= {f"{path}.{name}": s for name, s in quant_shapes(quants[path], k, (n,), dtype).items()}
    return out


def _dense_shapes(c: ModelConfig, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    d, f, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    def layer():
        p = {"input_norm.weight": s(d), "post_norm.weight": s(d), "attn.q_proj": s(d, q), "attn.k_proj": s(d, kv),
             "attn.v_proj": s(d, kv), "attn.o_proj": s(q, d), "mlp.gate_proj": s(d, f), "mlp.up_proj": s(d, f),
             "mlp.down_proj": s(f, d)}
        if c.attention_bias:
            p |= {"attn.q_bias": s(q), "attn.k_bias": s(kv), "attn.v_bias": s(kv)}
        if c.o_proj_bias:
            p["attn.o_bias"] = s(d)
        if c.qk_norm:
            p |= {"attn.q_norm.weight": s(c.head_dim), "attn.k_norm.weight": s(c.head_dim)}
        if c.mlp_bias:
            p |= {"mlp.gate_bias": s(f), "mlp.up_bias": s(f), "mlp.down_bias": s(d)}
        return p

    shapes = {"embed.weight": s(c.vocab_size, d)}
    for i in range(c.num_layers):
        shapes |= {f"layers.{i}.{name}": shape for name, shape in layer().items()}
    shapes["final_norm.weight"] = s(d)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = s(d, c.vocab_size)
    return shapes
