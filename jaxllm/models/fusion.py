"""Fused projections: params that share an input become one matrix, so a layer runs one matmul instead of several.

The loader fills the checkpoint layout (`param_shapes`: q_proj, k_proj, v_proj, gate_proj, up_proj, ...); before
the first step, `fuse_params` rewrites each layer into the layout the forward runs on, following the model's table
of `FusedProjection`s (vLLM's `packed_modules_mapping` idea, done once after loading rather than per checkpoint).

Why: at batch 1 a decode step is a chain of matrix-vector products; the small k/v ones ran far from the bandwidth
that one wider product reaches, and fusing also drops three launches per layer (docs/perf-notes.md#fused-projections).

Layout under tensor parallelism. A fused weight is [I, S, W]: S shards (the mesh's tp, or 1 when a part's width does
not divide), each holding the concatenation of every part's columns for that shard. The forward's
`einsum("TI,ISW->TSW")` is one matmul whose [T, S, W] output is split per shard along W, so slicing a part out and
flattening (S, W_part) gives that part's columns in their original order, sharded over "tp" exactly as the separate
projections were. kv-head parts (k/v) are first repeated to the KV cache's head slots (`sharding.kv_cache_heads`):
when kv-heads are fewer than devices, each shard then computes just the kv-head its q-heads attend with.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm import sharding
from jaxllm.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class FusedProjection:
    name: str  # the fused param: [I, S, W] for weights, [S, W] for biases
    parts: tuple[str, ...]  # checkpoint-layout params [I, O_i] / [O_i], concatenated per shard in this order


def create_parts_last[T](paths: Sequence[str], fusions: tuple[FusedProjection, ...], create: Callable[[int], T], *,
                         map_fn=map) -> list[T]:
    """[create(i) for each of `paths` (dotted param paths)], in tree order, with the calls made in two groups: every
    other param, then the fusion parts, each group in tree order. `map_fn` (a thread pool's map, say) may run the
    calls of a group at once; the parts still wait for every other param.

    Why: `fuse_params` frees the parts, and their space is then one free block, or holes the next layers' fused
    params fill, rather than holes between the weights too small for the KV cache
    (docs/perf-notes.md#kv-cache-sizing-the-largest-free-block-and-resident-bytes)."""
    part_names = {part for fusion in fusions for part in fusion.parts}
    is_part = [path.rsplit(".", 1)[-1] in part_names for path in paths]
    others = [i for i, p in enumerate(is_part) if not p]
    parts = [i for i, p in enumerate(is_part) if p]
    made: list = [None] * len(paths)
    for group in (others, parts):
        for i, value in zip(group, map_fn(create, group)):
            made[i] = value
    return made


def fuse_params(params: dict, fusions: tuple[FusedProjection, ...], config: ModelConfig, mesh: Mesh) -> dict:
    """Checkpoint layout -> run layout, layer by layer. Consumes `params`: each layer's separate projections are
    released as soon as its fused ones exist, so loading peaks at one layer above the model's size."""
    layers = params["layers"]
    fused = []
    for i in range(len(layers)):
        layer, layers[i] = layers[i], None
        fused.append(_fuse_layer(layer, fusions, config, mesh))
    return {**params, "layers": fused}


def _fuse_layer(layer: dict, fusions: tuple[FusedProjection, ...], config: ModelConfig, mesh: Mesh) -> dict:
    out = dict(layer)
    tp = sharding.tp_size(mesh)
    # Each kv-head fills this many KV cache head slots (more than 1 only when kv-heads are fewer than devices).
    kv_repeats = sharding.kv_cache_heads(config.num_kv_heads, tp) // config.num_kv_heads
    for fusion in fusions:
        if not any(part in layer for part in fusion.parts):
            continue  # e.g. the biases of a model without bias
        assert all(part in layer for part in fusion.parts), (fusion, sorted(layer))
        parts = tuple(out.pop(part) for part in fusion.parts)
        widths = [w.shape[-1] * (kv_repeats if name in sharding.KV_HEAD_PARAMS else 1)
                  for name, w in zip(fusion.parts, parts)]
        shards = tp if all(width % tp == 0 for width in widths) else 1
        shape = (*parts[0].shape[:-1], shards, sum(widths) // shards)
        # One small program per distinct shape, compiled once and reused by every layer (as dummy.py does).
        concat = jax.jit(_concatenate_shards, static_argnames=("names", "shards", "kv_repeats", "head_dim"),
                         out_shardings=sharding.param_sharding(fusion.name, shape, mesh))
        out[fusion.name] = concat(parts, fusion.parts, shards, kv_repeats, config.head_dim)
    return out


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
