"""Random weights made on the devices, for benchmarks and tests: the right shapes, dtype and sharding, no file.

One jitted program with `out_shardings` generates every param where it will live, so even Llama-3.1-8B shapes
never build a host array; each param's key is `fold_in(key(seed), leaf number)`, so values do not depend on how
the params are sharded.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.models.weight_map import dotted
from jaxllm.sharding import make_mesh, param_sharding

# std 0.02 is the HF initializer range: with RMSNorm between layers, activations and logits stay O(1) and finite.
_STD = 0.02
_NORMS = ("input_norm", "post_norm", "final_norm", "q_norm", "k_norm")


def dummy_params(model, *, dtype=jnp.bfloat16, mesh: Mesh | None = None, seed: int = 0) -> dict:
    mesh = make_mesh(1) if mesh is None else mesh
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model.param_shapes(dtype))
    paths = [dotted(path) for path, _ in leaves]
    shardings = [param_sharding(p, leaf.shape, mesh) for p, (_, leaf) in zip(paths, leaves)]

    def init():
        key = jax.random.key(seed)
        out = []
        for j, (path, (_, leaf)) in enumerate(zip(paths, leaves)):
            noise = _STD * jax.random.normal(jax.random.fold_in(key, j), leaf.shape, leaf.dtype)
            # Norm scales near 1 (as trained models have), everything else small and centred.
            out.append(noise + 1 if path.rsplit(".", 1)[-1] in _NORMS else noise)
        return out

    arrays = jax.jit(init, out_shardings=shardings)()
    return jax.tree_util.tree_unflatten(treedef, arrays)
