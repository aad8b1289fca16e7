"""One decoder layer as an nnx module (pre-norm attention, then the MLP, each added to the residual stream), and
`decoder_layer_step`, the jitted pure function of (layer graph, layer state, ...) the paged forward calls per layer.

Legend: T tokens, D hidden size, R = H // 2 rotary frequencies, C KV cache head slots, P pages, B tokens per page,
H head_dim.
"""

import functools
from typing import TYPE_CHECKING

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxllm.kv_cache import AttentionMetadata
from jaxllm.model_config import ModelConfig
from jaxllm.models.attention import Attention
from jaxllm.models.fusion import fused_shape, kv_repeats
from jaxllm.models.layers import add_rms_norm
from jaxllm.models.modules import MLP, RMSNorm
from jaxllm.sharding import tp_size

if TYPE_CHECKING:
    from jaxllm.quantization.linear_quant import LinearQuant


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, sliding_window: int | None, dtype, mesh: Mesh | None,
                 kernel_backend: str, quants: "dict[str, LinearQuant] | None" = None):
        """`quants`: the layer's quantized linears by layer-relative checkpoint path ("attn.q_proj"); others dense."""
        c = config
        quants = quants or {}
        tp = tp_size(mesh)
        gate_up = fused_shape((c.intermediate_size,) * 2, ("gate_proj", "up_proj"), (c.hidden_size,), tp=tp,
                              kv_repeats=kv_repeats(c, tp))
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.attn = Attention(c, sliding_window=sliding_window, dtype=dtype, mesh=mesh, kernel_backend=kernel_backend,
                              quants=quants)
        self.post_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(gate_up, c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype, quants=quants,
                       mesh=mesh, kernel_backend=kernel_backend)
        self.eps, self.mesh, self.kernel_backend = c.rms_norm_eps, mesh, kernel_backend

    def __call__(self, k_pages: jax.Array, v_pages: jax.Array, x: jax.Array, normed: jax.Array,
                 next_norm: jax.Array, cos: jax.Array, sin: jax.Array, metadata: AttentionMetadata,
                 steer: jax.Array | None = None):
        """The paged step -> (k_pages', v_pages', x', normed'): x [T, D] is the residual stream, `normed` is x normed
        for this layer, x' the stream after this layer and `normed'` x' normed with `next_norm` [D] (the next layer's
        input norm, or the final norm), each sublayer's add and the next norm being one step (`add_rms_norm`).

        x' comes back with `normed'` so a caller can gather the stream after each layer; a vector to add to the
        stream after this layer joins the MLP output before the last add-norm, which keeps `normed'` its norm:
        `steer` [T, D] (zeros on unsteered rows, which adding leaves bit-identical), None when no row steers."""
        k_pages, v_pages, h = self.attn(k_pages, v_pages, normed, cos, sin, metadata)
        x, normed = self._add_norm(x, h, self.post_norm.weight[...])
        h = self.mlp(normed)
        x, normed = self._add_norm(x, h if steer is None else h + steer, next_norm)
        return k_pages, v_pages, x, normed

    def dense(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """The cache-free forward of whole sequences: x [B, T, D], cos and sin [T, R] -> x' [B, T, D]."""
        x = x + self.attn.dense(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_norm(x).reshape(-1, x.shape[-1]), kernel=False).reshape(x.shape)

    def _add_norm(self, x: jax.Array, h: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
        return add_rms_norm(x, h, weight, self.eps, backend=self.kernel_backend, mesh=self.mesh)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decoder_layer(graphdef: nnx.GraphDef, state: nnx.State, k_pages: jax.Array, v_pages: jax.Array, x: jax.Array,
                   normed: jax.Array, next_norm: jax.Array, cos: jax.Array, sin: jax.Array,
                   metadata: AttentionMetadata, steer: jax.Array | None):
    """`DecoderLayer.__call__` as a pure function of the layer's graph (static) and state.

    Jitted, so that a step's layers, alike in graph and shapes, are traced and lowered once: the model step lowers
    one layer and calls it L times (XLA inlines the calls, so the compiled program is the same). Traced inline,
    every layer lowered its own Pallas kernels, and a warm start, whose compile cache skips only XLA's part, paid
    that for every bucket (docs/perf-notes.md#one-decoder-layer-lowered-per-bucket).
    """
    return nnx.merge(graphdef, state)(k_pages, v_pages, x, normed, next_norm, cos, sin, metadata, steer)


def decoder_layer_step(layer: DecoderLayer, k_pages: jax.Array, v_pages: jax.Array, x: jax.Array, normed: jax.Array,
                       next_norm: jax.Array, cos: jax.Array, sin: jax.Array, metadata: AttentionMetadata,
                       steer: jax.Array | None = None):
    """`layer(...)` through `_decoder_layer`: layers of equal graphs (every one, or one per attention kind) share
    one lowering per step."""
    graphdef, state = nnx.split(layer)
    return _decoder_layer(graphdef, state, k_pages, v_pages, x, normed, next_norm, cos, sin, metadata, steer)
