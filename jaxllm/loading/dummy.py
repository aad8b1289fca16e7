"""Random weights made on the devices, for benchmarks and tests: the right shapes, dtype and sharding, no file.

Jitted programs with `out_shardings` generate every param where it will live, so even Llama-3.1-8B shapes never
build a host array; each param's key is `fold_in(key(seed), its number in the checkpoint layout)`, so values do not
depend on how the params are sharded, nor on the order they are made in (fusion's parts last: models/fusion.py
create_parts_last).
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.models.fusion import create_parts_last
from jaxllm.sharding import make_mesh, param_sharding

# std 0.02 is the HF initializer range: with RMSNorm between layers, activations and logits stay O(1) and finite.
_STD = 0.02


def dummy_params(model, *, mesh: Mesh | None = None, seed: int = 0) -> dict[str, jax.Array]:
    """`model.checkpoint_shapes()` filled with random values: {dotted path: array} in the checkpoint layout."""
    mesh = make_mesh(1) if mesh is None else mesh
    shapes = model.checkpoint_shapes()
    paths = list(shapes)
    key = jax.random.key(seed)

    quants = dict(model.quants)

    def create(j: int) -> jax.Array:
        path, leaf = paths[j], shapes[paths[j]]
        # One small program per param rather than one for all: layers repeat shapes, so a model compiles one
        # program per distinct (shape, dtype, sharding) — a dozen for Llama-3.1-8B — and reuses them across calls.
        where = param_sharding(path, leaf.shape, mesh, model.config)
        linear, _, array = path.rpartition(".")
        if linear in quants:
            make = jax.jit(_random_quant_array, static_argnames=("shape", "dtype", "array", "quant"),
                           out_shardings=where)
            return make(key, j, leaf.shape, jnp.dtype(leaf.dtype), array, quants[linear])
        make = jax.jit(_random_param, static_argnames=("shape", "dtype", "is_norm"), out_shardings=where)
        return make(key, j, leaf.shape, jnp.dtype(leaf.dtype), path.endswith("norm.weight"))

    # A quantized linear's arrays count as its dense weight's path: fusion parts, made last.
    items = [p.rpartition(".")[0] if p.rpartition(".")[0] in quants else p for p in paths]
    return dict(zip(paths, create_parts_last(items, model.fused_projections, create)))


def _random_param(key: jax.Array, number: jax.Array, shape: tuple[int, ...], dtype, is_norm: bool) -> jax.Array:
    noise = _STD * jax.random.normal(jax.random.fold_in(key, number), shape, dtype)
    # Norm scales near 1 (as trained models have), everything else small and centred.
    return noise + 1 if is_norm else noise


def _random_quant_array(key: jax.Array, number: jax.Array, shape: tuple[int, ...], dtype, array: str,
                        quant) -> jax.Array:
    key, bits = jax.random.fold_in(key, number), quant.bits
    if array == "qweight":  # every value of every word uniform in [0, 2**bits)
        return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint32), jnp.int32)
    if array == "perm":
        return jax.random.permutation(key, shape[0]).astype(dtype)
    if array == "weight":  # fp8: N(0, 1) in e4m3, the scales bring it to _STD
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)
    if array == "zeros":  # about the middle of the range, as asymmetric quantization of centred weights gives
        return (2 ** (bits - 1) + jax.random.randint(key, shape, -1, 2)).astype(dtype)
    # Scales: uniform integers in [0, 2**bits) have std 2**bits / sqrt(12), the fp8 weights above 1.
    spread = 1.0 if quant.kind == "fp8" else 2**bits / 12**0.5
    return (_STD / spread * jax.random.uniform(key, shape, jnp.float32, 0.5, 1.5)).astype(dtype)
