"""Fused projections: params that share an input become one matrix, so a layer runs one matmul instead of several.

The loader fills the checkpoint layout (models/llama_weights.py `checkpoint_shapes`: attn.q_proj, attn.k_proj,
attn.v_proj, mlp.gate_proj, mlp.up_proj, ...); `fuse_params` then rewrites each layer into the layout the modules
hold and run on, following the model's table of `FusedProjection`s (vLLM's `packed_modules_mapping` idea, done once
after loading rather than per checkpoint); `fused_shape` gives the same shapes to the abstract model.

Why: at batch 1 a decode step is a chain of matrix-vector products; the small k/v ones ran far from the bandwidth
that one wider product reaches, and fusing also drops three launches per layer (docs/perf-notes.md#fused-projections).

Layout under tensor parallelism. A fused weight is [I, S, W]: S shards (the mesh's tp, or 1 when a part's width does
not divide), each holding the concatenation of every part's columns for that shard. The forward's
`einsum("TI,ISW->TSW")` is one matmul whose [T, S, W] output is split per shard along W, so slicing a part out and
flattening (S, W_part) gives that part's columns in their original order, sharded over "tp" exactly as the separate
projections were. kv-head parts (k/v) are first repeated to the KV cache's head slots (`sharding.kv_cache_heads`):
when kv-heads are fewer than devices, each shard then computes just the kv-head its q-heads attend with.

Quantized parts (models/quant_linear.py) fuse array by array the same way: their qweight [K / E, N_i], scales and
zeros [K / G, N_i] all have the output columns last, so each becomes [K / E, S, W] / [K / G, S, W]; an act-order
permutation of the input is one for the fused projection, and the parts must share it.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxllm import sharding
from jaxllm.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FusedProjection:
    name: str  # the fused param, relative to its layer ("attn.qkv_proj"): [I, S, W] for weights, [S, W] for biases
    parts: tuple[str, ...]  # checkpoint-layout params [I, O_i] / [O_i], concatenated per shard in this order


def layer_relative(path: str) -> str:
    """"layers.3.attn.q_proj" -> "attn.q_proj"; a path outside the layers is returned as it is."""
    head, _, rest = path.partition(".")
    index, _, relative = rest.partition(".")
    return relative if head == "layers" and index.isdigit() else path


def create_parts_last[T](paths: Sequence[str], fusions: tuple[FusedProjection, ...], create: Callable[[int], T], *,
                         map_fn=map) -> list[T]:
    """[create(i) for each of `paths` (dotted param paths)], in tree order, with the calls made in two groups: every
    other param, then the fusion parts, each group in tree order. `map_fn` (a thread pool's map, say) may run the
    calls of a group at once; the parts still wait for every other param.

    Why: `fuse_params` frees the parts, and their space is then one free block, or holes the next layers' fused
    params fill, rather than holes between the weights too small for the KV cache
    (docs/perf-notes.md#kv-cache-sizing-the-largest-free-block-and-resident-bytes)."""
    part_names = {part for fusion in fusions for part in fusion.parts}
    is_part = [layer_relative(path) in part_names for path in paths]
    others = [i for i, p in enumerate(is_part) if not p]
    parts = [i for i, p in enumerate(is_part) if p]
    made: list = [None] * len(paths)
    for group in (others, parts):
        for i, value in zip(group, map_fn(create, group)):
            made[i] = value
    return made


def fused_shape(part_widths: Sequence[int], part_names: Sequence[str], lead: tuple[int, ...], *, tp: int,
                kv_repeats: int) -> tuple[int, ...]:
    """The fused param's shape [*lead, S, W] for parts [*lead, O_i]: what `fuse_params` makes, known without data
    (the model's abstract state). kv-head parts count `kv_repeats` times."""
    widths = [w * (kv_repeats if _leaf(name) in sharding.KV_HEAD_PARAMS else 1)
              for name, w in zip(part_names, part_widths)]
    shards = tp if all(width % tp == 0 for width in widths) else 1
    return (*lead, shards, sum(widths) // shards)


def kv_repeats(config: ModelConfig, tp: int) -> int:
    """How many KV cache head slots each kv-head fills (more than 1 only when kv-heads are fewer than devices)."""
    return sharding.kv_cache_heads(config.num_kv_heads, tp) // config.num_kv_heads


def fuse_params(params: dict[str, jax.Array], fusions: tuple[FusedProjection, ...], config: ModelConfig,
                mesh: Mesh) -> dict[str, jax.Array]:
    """Checkpoint layout -> run layout, layer by layer, over {dotted path: array}. Consumes `params`: each layer's
    separate projections are released as soon as its fused ones exist, so loading peaks at one layer above the
    model's size."""
    for i in range(config.num_layers):
        _fuse_layer(params, f"layers.{i}.", fusions, config, mesh)
    return params


def _fuse_layer(params: dict, prefix: str, fusions: tuple[FusedProjection, ...], config: ModelConfig,
                mesh: Mesh) -> None:
    tp = sharding.tp_size(mesh)
    repeats = kv_repeats(config, tp)
    for fusion in fusions:
        # "" for a dense fusion, ".qweight", ".scales", ... for a quantized one
        for suffix in ("", *(f".{array}" for array in sharding.QUANT_ARRAYS)):
            present = [prefix + part + suffix in params for part in fusion.parts]
            if not any(present):
                continue  # e.g. the biases of a model without bias
            assert all(present), (fusion, prefix, suffix)
            parts = tuple(params.pop(prefix + part + suffix) for part in fusion.parts)
            if suffix == ".perm":
                params[prefix + fusion.name + suffix] = _shared_perm(parts, prefix + fusion.name)
                continue
            shape = fused_shape([w.shape[-1] for w in parts], fusion.parts, parts[0].shape[:-1], tp=tp,
                                kv_repeats=repeats)
            # One small program per distinct shape, compiled once and reused by every layer (as dummy.py does).
            concat = jax.jit(_concatenate_shards, static_argnames=("names", "shards", "kv_repeats", "head_dim"),
                             out_shardings=sharding.param_sharding(prefix + fusion.name + suffix, shape, mesh))
            params[prefix + fusion.name + suffix] = concat(parts, tuple(map(_leaf, fusion.parts)), shape[-2],
                                                           repeats, config.head_dim)


def _shared_perm(perms: tuple[jax.Array, ...], fused: str) -> jax.Array:
    """The one input permutation of a fused act-order projection: its parts read the same input, so GPTQ gives them
    the same g_idx; one kernel cannot permute its input two ways."""
    first, *others = (np.asarray(p.addressable_data(0)) for p in perms)  # replicated: any local copy is whole
    if any(not np.array_equal(first, p) for p in others):
        raise ValueError(f"{fused}: its parts are act-ordered differently (their g_idx differ), so they cannot "
                         f"run as one fused projection")
    return perms[0]


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _concatenate_shards(parts: tuple[jax.Array, ...], names: tuple[str, ...], shards: int, kv_repeats: int,
                        head_dim: int) -> jax.Array:
    """[..., O_i] each -> [..., S, sum(O_i') / S]. kv-head parts get each head repeated `kv_repeats` times first
    (cache slot c holds kv-head c // kv_repeats), so O_i' = O_i * kv_repeats for them."""
    columns = []
    for name, w in zip(names, parts):
        if name in sharding.KV_HEAD_PARAMS:
            heads = w.reshape(*w.shape[:-1], w.shape[-1] // head_dim, head_dim)
            w = jnp.repeat(heads, kv_repeats, axis=-2).reshape(*w.shape[:-1], -1)
        columns.append(w.reshape(*w.shape[:-1], shards, w.shape[-1] // shards))
    return jnp.concatenate(columns, axis=-1)


def split_fused(y: jax.Array, widths: tuple[int, ...]) -> list[jax.Array]:
    """A fused product [T, S, W] -> one [T, S * w_i] per part, w_i being part i's width within a shard."""
    assert sum(widths) == y.shape[-1], (widths, y.shape)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [y[..., s:s + w].reshape(*y.shape[:-2], y.shape[-2] * w) for s, w in zip(starts, widths)]
