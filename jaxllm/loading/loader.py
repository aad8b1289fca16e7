"""The generic loader: a tensor source + a model's weight map (data, see models/weight_map.py) -> placed params.

Every param is created with `jax.make_array_from_callback` and its final sharding: each device asks the source for
only its own shard (`read(name, index)`), so no device, and no host buffer, ever holds a full copy it does not need.
Several params are placed at once (a thread pool), all others before the first fusion part (`create_parts_last`).
Safetensors directories, GGUF files (whose reader yields HF names and layouts) and test fakes are all sources.
"""

import concurrent.futures
import dataclasses
from collections.abc import Iterable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.dtypes import canonical_dtype
from jaxllm.model_config import ModelConfig
from jaxllm.models.fusion import create_parts_last
from jaxllm.models.weight_map import WeightRule, name_regex
from jaxllm.sharding import make_mesh, param_sharding

# Params placed at once: each thread copies its blocks out of the checkpoint (page faults: reads from disk) while
# others' travel to the devices; numpy's copies and JAX's transfers run outside the GIL
# (docs/perf-notes.md#threaded-weight-loading).
_LOAD_THREADS = 8


class TensorSource(Protocol):
    """Checkpoint tensors by Hugging Face name, in Hugging Face layout, read lazily."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Where one param's data lies: rows [offset, offset + size) of checkpoint tensor `name`; when `transpose`, the
    param is those rows transposed (HF Linear [out, in] -> our [in, out])."""

    name: str
    offset: int
    transpose: bool


def resolve_dtype(dtype: str, config: ModelConfig, source: TensorSource | None = None):
    """"auto" is the checkpoint's dtype (config.json's, else the embedding tensor's); float32 stays float32."""
    if dtype != "auto":
        return getattr(jnp, canonical_dtype(dtype))
    if config.dtype is not None:
        return getattr(jnp, config.dtype)
    if source is not None and "model.embed_tokens.weight" in source.keys():
        stored = np.dtype(source.dtype("model.embed_tokens.weight"))
        for jdt in (jnp.float32, jnp.bfloat16, jnp.float16):
            if stored == np.dtype(jdt):
                return jdt
    return jnp.float32  # e.g. dequantized GGUF tensors: keep what the source produced, losslessly


def plan(source: TensorSource, rules: tuple[WeightRule, ...], ignored: tuple[str, ...],
         shapes: dict[str, tuple[int, ...]]) -> dict[str, _Piece]:
    """Match every checkpoint tensor to params; raise on an unexpected, misshapen, duplicate or missing one."""
    compiled = [(rule, rule.regex) for rule in rules]
    ignored_res = [name_regex(pattern) for pattern in ignored]
    pieces: dict[str, _Piece] = {}
    for name in sorted(source.keys()):
        if any(r.match(name) for r in ignored_res):
            continue
        match = next(((rule, m) for rule, regex in compiled if (m := regex.match(name))), None)
        if match is None:
            raise ValueError(f"unexpected checkpoint tensor {name!r}: no rule of the model's weight map matches it")
        rule, m = match
        targets = rule.targets(m)
        present = [t in shapes for t in targets]
        if not any(present) and rule.skip_if_absent:
            continue
        if not all(present):
            raise ValueError(f"unexpected checkpoint tensor {name!r}: the model (as configured) has no param "
                             f"{[t for t, p in zip(targets, present) if not p]}")
        expected = _checkpoint_shape(rule, [shapes[t] for t in targets])
        if tuple(source.shape(name)) != expected:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(source.shape(name))}, the model expects "
                             f"{expected} (for {', '.join(targets)})")
        offset = 0
        for t in targets:
            if t in pieces:
                raise ValueError(f"param {t} is given twice: by {pieces[t].name!r} and {name!r}")
            pieces[t] = _Piece(name, offset, rule.transpose)
            offset += shapes[t][1] if rule.transpose else shapes[t][0]
    missing = [p for p in shapes if p not in pieces]
    if missing:
        hints = [f"{p} (e.g. {_hf_name_for(p, rules)})" for p in missing[:8]]
        raise ValueError(f"{len(missing)} params have no checkpoint tensor: {', '.join(hints)}"
                         + (" ..." if len(missing) > 8 else ""))
    return pieces


def load_params(source: TensorSource, model, *, mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """`model.checkpoint_shapes()` (its dtype is the model's) filled from `source` through `model.weight_map`, each
    param placed on `mesh`: {dotted path: array} in the checkpoint layout, for `fuse_params`."""
    mesh = make_mesh(1) if mesh is None else mesh
    shapes = model.checkpoint_shapes()
    pieces = plan(source, model.weight_map, model.ignored_weights, {p: s.shape for p, s in shapes.items()})
    paths = list(shapes)

    def create(j: int) -> jax.Array:
        path, shape = paths[j], shapes[paths[j]]
        where = param_sharding(path, shape.shape, mesh, model.config)
        return _place(source, pieces[path], shape.shape, where, jnp.dtype(shape.dtype))

    with concurrent.futures.ThreadPoolExecutor(_LOAD_THREADS) as pool:
        params = create_parts_last(paths, model.fused_projections, create, map_fn=pool.map)
    return dict(zip(paths, params))


def _place(source: TensorSource, piece: _Piece, shape: tuple[int, ...], sharding: NamedSharding, dtype) -> jax.Array:
    """One param on its devices. The blocks travel in checkpoint layout and dtype; transposing and casting happen on
    the devices, where they are nearly free (a host transpose-copy of one 8B-model MLP matrix takes ~1 s)."""
    stored_shape = shape[::-1] if piece.transpose else shape
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    stored_sharding = NamedSharding(sharding.mesh, P(*(spec[::-1] if piece.transpose else spec)))
    stored = jax.make_array_from_callback(
        stored_shape, stored_sharding, lambda index: _read_block(source, piece, index, stored_shape))
    if not piece.transpose and stored.dtype == dtype:
        return stored
    # Compiled once per shape and dtype.
    convert = jax.jit(_to_param, static_argnames=("transpose", "dtype"), out_shardings=sharding)
    return convert(stored, piece.transpose, dtype)


def _to_param(stored: jax.Array, transpose: bool, dtype) -> jax.Array:
    return (stored.T if transpose else stored).astype(dtype)


def _read_block(source: TensorSource, piece: _Piece, index: tuple[slice, ...], shape) -> np.ndarray:
    """One device's block `index` (in checkpoint layout) of a param: rows shifted by the param's offset."""
    first, *rest = (slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    block = source.read(piece.name, (slice(piece.offset + first.start, piece.offset + first.stop), *rest))
    # jax has no float64 without x64 mode: narrow on the host rather than let it truncate silently.
    return block.astype(np.float32) if block.dtype == np.float64 else block


def _checkpoint_shape(rule: WeightRule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if rule.transpose:
        assert all(len(s) == 2 and s[0] == shapes[0][0] for s in shapes), (rule, shapes)
        return (sum(s[1] for s in shapes), shapes[0][0])
    assert all(s[1:] == shapes[0][1:] for s in shapes), (rule, shapes)
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _hf_name_for(path: str, rules: tuple[WeightRule, ...]) -> str:
    """A checkpoint name that would fill `path`, for error messages."""
    for rule in rules:
        for p in rule.params:
            m = name_regex(p).match(path)
            if m:
                return rule.hf.replace("{i}", m.groupdict().get("i") or "")
    return "?"
