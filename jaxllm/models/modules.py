"""The small nnx modules of a decoder: RMSNorm, the token embedding, the vocabulary head, the SwiGLU MLP.

Legend: T tokens, D hidden size, F MLP size, V vocabulary, S tp shards of a fused projection (models/fusion.py).

Each holds its `nnx.Param`s and calls the stateless functions of models/layers.py, which the paged and the dense
forward share. Params absent from a config (biases) are None attributes, part of the graph, not of the state.
A projection's weight (the vocabulary head's too, when it is not the tied embedding) is a dense Param or, in a
quantized checkpoint, a QuantLinear (models/quant_linear.py); `projection` makes either and `project` runs either,
the dense one through the same einsum as ever.
"""

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.models.fusion import split_fused
from jaxllm.models.layers import embed, fused_linear, linear, rms_norm
from jaxllm.models.quant_linear import QuantLinear

if TYPE_CHECKING:
    from jaxllm.quantization.linear_quant import LinearQuant


def zeros_param(shape: tuple[int, ...], dtype) -> nnx.Param:
    # Zeros: a model is built abstract (nnx.eval_shape) and its state filled by a loader.
    return nnx.Param(jnp.zeros(shape, dtype))


def param_value(param: nnx.Param | None) -> jax.Array | None:
    return None if param is None else param[...]


def projection(quant: "LinearQuant | None", in_features: int, out_shape: tuple[int, ...], *, parallel: str, dtype,
               mesh: Mesh | None, kernel_backend: str) -> nnx.Param | QuantLinear:
    """A projection's weight: a dense [I, *O] Param, or the quantized linear `quant` says it is stored as, split
    over tp as `parallel` ("column" or "row", jaxllm.sharding's layout of its dense twin) says."""
    if quant is None:
        return zeros_param((in_features, *out_shape), dtype)
    return QuantLinear(quant, in_features, out_shape, parallel=parallel, dtype=dtype, mesh=mesh,
                       kernel_backend=kernel_backend)


def project(x: jax.Array, weight: nnx.Param | QuantLinear, bias: nnx.Param | None = None, *,
            kernel: bool = True) -> jax.Array:
    """x [T, I] through a projection -> [T, *O] (+ bias [*O]); `kernel=False`: a quantized one as jnp (the dense
    forward, differentiable)."""
    if isinstance(weight, QuantLinear):
        y = weight(x, kernel=kernel)
        return y if bias is None else y + bias[...]
    w = weight[...]
    return (fused_linear if w.ndim == 3 else linear)(x, w, param_value(bias))


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
    def __init__(self, dim: int, vocab_size: int, *, quant: "LinearQuant | None" = None, dtype,
                 mesh: Mesh | None = None, kernel_backend: str = "auto"):
        """`quant`: how a quantized checkpoint stores the head (None: dense)."""
        # [D, V] or its packed arrays, vocab-parallel under tp: a column-parallel linear over V.
        self.weight = projection(quant, dim, (vocab_size,), parallel="column", dtype=dtype, mesh=mesh,
                                 kernel_backend=kernel_backend)

    def __call__(self, x: jax.Array, *, kernel: bool = True) -> jax.Array:  # [T, D] -> [T, V]
        """`kernel=False`: a quantized head as jnp (the dense forward, differentiable)."""
        if isinstance(self.weight, QuantLinear):
            return self.weight(x, kernel=kernel)
        return jnp.einsum("TD,DV->TV", x, self.weight[...])


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one fused product."""

    def __init__(self, gate_up_shape: tuple[int, ...], dim: int, intermediate: int, *, bias: bool, dtype,
                 quants: "dict[str, LinearQuant]", mesh: Mesh | None, kernel_backend: str):
        """`quants`: how "mlp.gate_proj" (and so up_proj: one fusion) and "mlp.down_proj" are stored, absent: dense."""
        where = dict(dtype=dtype, mesh=mesh, kernel_backend=kernel_backend)
        self.gate_up_proj = projection(quants.get("mlp.gate_proj"), dim, gate_up_shape[1:], parallel="column",
                                       **where)  # [D, S, 2F / S]
        self.gate_up_bias = zeros_param(gate_up_shape[1:], dtype) if bias else None  # [S, 2F / S]
        self.down_proj = projection(quants.get("mlp.down_proj"), intermediate, (dim,), parallel="row",
                                    **where)  # [F, D]
        self.down_bias = zeros_param((dim,), dtype) if bias else None  # [D]

    def __call__(self, x: jax.Array, *, kernel: bool = True) -> jax.Array:  # [T, D] -> [T, D]
        gate_up = project(x, self.gate_up_proj, self.gate_up_bias, kernel=kernel)  # [T, S, 2F / S]
        gate, up = split_fused(gate_up, (gate_up.shape[-1] // 2,) * 2)  # [T, F] each
        return project(jax.nn.silu(gate) * up, self.down_proj, self.down_bias, kernel=kernel)
