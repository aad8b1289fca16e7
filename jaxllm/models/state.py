"""A model's state as {dotted path: array}: filled by the loaders, and split from the module once for the runner.

Paths are the nnx state paths joined with dots ("layers.3.attn.qkv_proj"), the keys of the sharding table
(jaxllm.sharding.PARAM_SPECS) and of the weight map's targets.
"""

import dataclasses

import jax
from flax import nnx


def dotted_path(path: tuple) -> str:
    """An nnx state path ("layers", 3, "attn", "qkv_proj") -> "layers.3.attn.qkv_proj"."""
    return ".".join(map(str, path))


def fill(model: nnx.Module, params: dict[str, jax.Array]) -> nnx.Module:
    """Set every param of `model` (built abstract, `nnx.eval_shape`) from `params`, in place: the module then holds
    those very arrays. Consumes `params`."""
    flat = nnx.to_flat_state(nnx.state(model))
    missing = sorted(set(map(dotted_path, (path for path, _ in flat))) - set(params))
    assert not missing, f"no value for {missing}"
    for path, var in flat:
        value = params.pop(dotted_path(path))
        assert (value.shape, value.dtype) == (var.shape, var.dtype), (path, value.shape, var.shape)
        var.set_value(value)
    assert not params, f"params the model has not: {sorted(params)}"
    return model


@dataclasses.dataclass(frozen=True)
class ModuleLayout:
    """What `nnx.merge` needs besides the arrays: the graph, and the state's tree of Variables with its paths in
    leaf order. Frozen: the runner builds it once and every trace of the step rebuilds the module from it."""

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef
    paths: tuple[str, ...]

    @classmethod
    def split(cls, model: nnx.Module) -> tuple["ModuleLayout", dict[str, jax.Array]]:
        """-> (layout, {path: array}): the arrays are the module's own, not copies. A flat dict of arrays, not the
        nnx.State, is what the step takes: jit flattens it in C++, where a State of Variables costs a Python call
        per param on every step."""
        graphdef, state = nnx.split(model)
        keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
        # A keypath ends in the Variable's own key (its value); the rest names the param.
        paths = tuple(dotted_path(tuple(getattr(k, "key", k) for k in keypath[:-1])) for keypath, _ in keyed)
        return cls(graphdef, treedef, paths), dict(zip(paths, (leaf for _, leaf in keyed)))

    def merge(self, params: dict[str, jax.Array]) -> nnx.Module:
        """The module over `params` (traced values inside a jitted step)."""
        state = jax.tree_util.tree_unflatten(self.treedef, [params[p] for p in self.paths])
        return nnx.merge(self.graphdef, state)


def state_dict(model: nnx.Module) -> dict[str, jax.Array]:
    """{dotted path: array} of the module's params: its own arrays, not copies."""
    return ModuleLayout.split(model)[1]
