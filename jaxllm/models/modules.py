"""The small nnx modules of a decoder: RMSNorm, the token embedding, the vocabulary head, the SwiGLU MLP.

Legend: T tokens, D hidden size, F MLP size, V vocabulary, S tp shards of a fused projection (models/fusion.py).

Each holds its `nnx.Param`s and calls the stateless functions of models/layers.py, which the paged and the dense
forward share. Params absent from a config (biases) are None attributes, part of the graph, not of the state.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.models.fusion import split_fused
from jaxllm.models.layers import embed, fused_linear, linear, rms_norm


def zeros_param(shape: tuple[int, ...], dtype) -> nnx.Param:
    # Zeros: a model is built abstract (nnx.eval_shape) and its state filled by a loader.
    return nnx.Param(jnp.zeros(shape, dtype))


def param_value(param: nnx.Param | None) -> jax.Array | None:
    return None if param is None else param[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = zeros_param((dim,), dtype)  # [D]
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        return rms_norm(x, self.weight[...], self.eps)


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, dtype, mesh: Mesh | None):
        self.weight = zeros_param((vocab_size, dim), dtype)  # [V, D], vocab-parallel under tp
        self.mesh = mesh

    def __call__(self, token_ids: jax.Array) -> jax.Array:  # i32[T] -> [T, D]
        return embed(self.weight[...], token_ids, self.mesh)

    def attend(self, x: jax.Array) -> jax.Array:
        """The tied head: x [T, D] -> [T, V] against the table itself."""
        return jnp.einsum("TD,VD->TV", x, self.weight[...])


class LMHead(nnx.Module):
    def __init__(self, dim: int, vocab_size: int, dtype):
        self.weight = zeros_param((dim, vocab_size), dtype)  # [D, V], vocab-parallel under tp

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, V]
        return jnp.einsum("TD,DV->TV", x, self.weight[...])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one fused product."""

    def __init__(self, gate_up_shape: tuple[int, ...], dim: int, intermediate: int, *, bias: bool, dtype):
        self.gate_up_proj = zeros_param(gate_up_shape, dtype)  # [D, S, 2F / S]
        self.gate_up_bias = zeros_param(gate_up_shape[1:], dtype) if bias else None  # [S, 2F / S]
        self.down_proj = zeros_param((intermediate, dim), dtype)  # [F, D]
        self.down_bias = zeros_param((dim,), dtype) if bias else None  # [D]

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        gate_up = fused_linear(x, self.gate_up_proj[...], param_value(self.gate_up_bias))  # [T, S, 2F / S]
        gate, up = split_fused(gate_up, (gate_up.shape[-1] // 2,) * 2)  # [T, F] each
        return linear(jax.nn.silu(gate) * up, self.down_proj[...], param_value(self.down_bias))
