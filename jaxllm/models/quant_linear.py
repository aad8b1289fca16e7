"""A quantized linear layer as an nnx module: the packed arrays of one projection (or one fused projection) and its
matmul, in place of the dense weight [K, *O] the model holds otherwise.

Legend: T tokens, K input features, O the output axes of the dense weight it replaces: (N,), or (S, W) for a fused
projection (S tp shards of W columns, models/fusion.py), G rows of K per group, E = 32 // bits values per word.

Arrays (jaxllm/quantization/linear_quant.py's canonical ones, with N laid out as the dense weight's O):
    int:  qweight i32[K / E, *O]   scales [K / G, *O]   zeros [K / G, *O]   perm i32[K] (act_order only)
    fp8:  weight e4m3[K, *O]       scales f32[1, *O]
The integer and fp8 weights and the permutation are `QuantData`, not nnx.Param: nnx.grad's default filter (Param)
then differentiates the scales and zeros and skips what has no gradient.

Under tensor parallelism the arrays are split as the dense weight (jaxllm/sharding.py): `parallel` says how, from
the site that builds the module ("column": q/k/v, gate/up, the vocabulary head; "row": o, down).
"""

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm import sharding
from jaxllm.models.state import dotted_path
from pallas_kernels.backend import TRITON, resolve_backend
from pallas_kernels.fp8_matmul import fp8_matmul
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.quant_matmul_reference import quant_matmul_reference
from pallas_kernels.sharded import quant_matmul_sharded

if TYPE_CHECKING:  # linear_quant reaches the loader, which builds these modules
    from jaxllm.quantization.linear_quant import LinearQuant


PARALLEL = ("column", "row")  # outputs split over tp (each device its columns), or inputs (partial sums, psum'd)


class QuantData(nnx.Variable):
    """Stored quantized weights and permutations: part of the state, not trainable."""


def array_dtype(quant: "LinearQuant", array: str, model_dtype) -> jnp.dtype:
    """int32 packed words and perm, e4m3 fp8 weights, f32 fp8 scales; int scales and zeros in the model's dtype
    when it is float32, else float16 (the formats' own, so fp16 scales stay exact)."""
    if array in ("qweight", "perm"):
        return jnp.dtype(jnp.int32)
    if array == "weight":
        return jnp.dtype(jnp.float8_e4m3fn)
    if quant.kind == "fp8":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(jnp.float32 if jnp.dtype(model_dtype) == jnp.float32 else jnp.float16)


def quant_shapes(quant: "LinearQuant", in_features: int, out_shape: tuple[int, ...],
                 model_dtype) -> dict[str, jax.ShapeDtypeStruct]:
    """{array: shape and dtype} of a linear of K = in_features inputs whose outputs are laid out as `out_shape`."""
    shapes = quant.shapes(in_features, math.prod(out_shape))
    return {name: jax.ShapeDtypeStruct(shape if name == "perm" else (*shape[:-1], *out_shape),
                                       array_dtype(quant, name, model_dtype)) for name, shape in shapes.items()}


class QuantLinear(nnx.Module):
    """`y = linear(x)`: x [T, K] -> [T, *O], through pallas_kernels.quant_matmul (int) or the fp8 product."""

    def __init__(self, quant: "LinearQuant", in_features: int, out_shape: tuple[int, ...], *, parallel: str, dtype,
                 mesh: Mesh | None, kernel_backend: str):
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}; got {parallel!r}")
        # Zeros: the model is built abstract (nnx.eval_shape) and a loader fills its state.
        made = {name: jnp.zeros(s.shape, s.dtype) for name, s in
                quant_shapes(quant, in_features, out_shape, dtype).items()}
        if quant.kind == "fp8":
            self.weight = QuantData(made["weight"])  # e4m3[K, *O]
            self.scales = nnx.Param(made["scales"])  # f32[1, *O]
        else:
            self.qweight = QuantData(made["qweight"])  # i32[K / E, *O]
            self.scales = nnx.Param(made["scales"])  # [K / G, *O]
            self.zeros = nnx.Param(made["zeros"])  # [K / G, *O]
            self.perm = QuantData(made["perm"]) if quant.act_order else None  # i32[K]
        self.quant, self.parallel, self.mesh, self.kernel_backend = quant, parallel, mesh, kernel_backend

    def __call__(self, x: jax.Array, *, kernel: bool = True) -> jax.Array:  # [T, K] -> [T, *O]
        """`kernel=False` runs the jnp expression (the dense research forward: differentiable in the scales)."""
        out_shape = self.scales.shape[1:]
        scales = self.scales[...].reshape(self.scales.shape[0], -1)
        if self.quant.kind == "fp8":
            weight = self.weight[...].reshape(self.weight.shape[0], -1)
            y = fp8_matmul(x, weight, scales, dynamic_activations=self.quant.dynamic_activations,
                           backend=self.kernel_backend if kernel else "reference")
        else:
            if self.perm is not None:  # the kernel's row r is input perm[r] (rows sorted by group at load)
                x = jnp.take(x, self.perm[...], axis=1)
            y = self._int_matmul(x, self.qweight[...].reshape(self.qweight.shape[0], -1), scales,
                                 self.zeros[...].reshape(scales.shape), kernel=kernel)
        return y.reshape(*x.shape[:-1], *out_shape)

    def _int_matmul(self, x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                    kernel: bool) -> jax.Array:
        """x [T, K] @ the dequantized [K, N]. The dense forward (`kernel=False`) runs the jnp expression: it
        differentiates. Under tensor parallelism the Pallas kernel runs per device on its shard of the arrays
        (quant_matmul_sharded) where the backend has it; elsewhere GSPMD partitions the jnp expression over the
        sharded words and groups, which it cannot do to a Pallas call."""
        bits, tp = self.quant.bits, sharding.tp_size(self.mesh)
        if not kernel:
            return quant_matmul_reference(x, qweight, scales, zeros, bits=bits)
        if tp == 1:
            return quant_matmul(x, qweight, scales, zeros, bits=bits, backend=self.kernel_backend)
        if resolve_backend(self.kernel_backend) == TRITON and self._split(tp):
            return quant_matmul_sharded(x, qweight, scales, zeros, bits=bits, mesh=self.mesh, axis=sharding.TP,
                                        parallel=self.parallel, backend=TRITON)
        return quant_matmul_reference(x, qweight, scales, zeros, bits=bits)

    def _split(self, tp: int) -> bool:
        """Whether the arrays are split over tp as `parallel` says. Row-parallel ones always are (the loader refuses
        groups that do not divide); column-parallel ones stay whole where their leading output axis does not
        divide (jaxllm.sharding.param_spec: a vocabulary, or a fused projection of one shard)."""
        return self.parallel == "row" or self.scales.shape[1] % tp == 0


def quantized_paths(model: nnx.Module) -> frozenset[str]:
    """The state paths of `model`'s quantized linears ("layers.0.attn.qkv_proj"): their arrays are "<path>.<name>"."""
    return frozenset(dotted_path(path) for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear))
