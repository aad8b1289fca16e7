"""The generic loader: a tensor source + a model's weight map (data, see models/weight_map.py) -> placed params.

Every param is created with `jax.make_array_from_callback` and its final sharding: each device asks the source for
only its own shard (`read(name, index)`), so no device, and no host buffer, ever holds a full copy it does not need.
Several params are placed at once (a thread pool), all others before the first fusion part (`create_parts_last`).
Safetensors directories, GGUF files (whose reader yields HF names and layouts) and test fakes are all sources.

A quantized model's packed linears are read by their format (a QuantFormat, jaxllm/quantization/linear_quant.py)
as whole host arrays, then placed with their shardings; the weight map never sees the tensors the format reads.
"""

import concurrent.futures
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.dtypes import canonical_dtype
from jaxllm.model_config import ModelConfig
from jaxllm.models.fusion import create_parts_last
from jaxllm.models.weight_map import Linear, WeightRule, name_regex
from jaxllm.sharding import make_mesh, param_sharding

if TYPE_CHECKING:  # linear_quant imports this module's TensorSource
    from jaxllm.quantization.linear_quant import LinearQuant, QuantFormat

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
         shapes: dict[str, tuple[int, ...]], consumed: frozenset[str] = frozenset()) -> dict[str, _Piece]:
    """Match every checkpoint tensor, but those `consumed` by a quantized format, to params; raise on an unexpected,
    misshapen, duplicate or missing one."""
    compiled = [(rule, rule.regex) for rule in rules]
    ignored_res = [name_regex(pattern) for pattern in ignored]
    pieces: dict[str, _Piece] = {}
    for name in sorted(source.keys()):
        if name in consumed or any(r.match(name) for r in ignored_res):
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


def load_params(source: TensorSource, model, *, mesh: Mesh | None = None,
                quant_format: "QuantFormat | None" = None) -> dict[str, jax.Array]:
    """`model.checkpoint_shapes()` (its dtype is the model's) filled from `source` through `model.weight_map`, and
    its quantized linears (`model.quants`) through `quant_format`, each param placed on `mesh`: {dotted path:
    array} in the checkpoint layout, for `fuse_params`."""
    mesh = make_mesh(1) if mesh is None else mesh
    shapes = model.checkpoint_shapes()
    quants = dict(model.quants)
    assert quant_format is not None or not quants, "a quantized model needs its format to load"
    linears = model.linears(model.config) if quants else {}
    consumed = frozenset(name for path in quants for name in quant_format.tensor_names(linears[path].module))
    dense = {p: s.shape for p, s in shapes.items() if p.rpartition(".")[0] not in quants}
    pieces = plan(source, model.weight_map, model.ignored_weights, dense, consumed)
    # One item per dense param and one per quantized linear (all its arrays), in state order.
    items = list(dict.fromkeys(p.rpartition(".")[0] if p.rpartition(".")[0] in quants else p for p in shapes))

    def create(j: int) -> dict[str, jax.Array]:
        path = items[j]
        if path in quants:
            return _place_quantized(source, quant_format, path, linears[path], quants[path], shapes, mesh,
                                    model.config)
        where = param_sharding(path, shapes[path].shape, mesh, model.config)
        return {path: _place(source, pieces[path], shapes[path].shape, where, jnp.dtype(shapes[path].dtype))}

    with concurrent.futures.ThreadPoolExecutor(_LOAD_THREADS) as pool:
        made = create_parts_last(items, model.fused_projections, create, map_fn=pool.map)
    params = {path: array for arrays in made for path, array in arrays.items()}
    return {path: params[path] for path in shapes}


def _place_quantized(source: TensorSource, quant_format: "QuantFormat", path: str, linear: Linear,
                     quant: "LinearQuant", shapes: dict[str, jax.ShapeDtypeStruct], mesh: Mesh,
                     config: ModelConfig) -> dict[str, jax.Array]:
    """One quantized linear's arrays, read whole on the host by its format, each placed with its sharding."""
    arrays = quant_format.read(source, linear.module, quant, linear.in_features, linear.out_features)
    if set(arrays) != set(quant.arrays()):
        raise ValueError(f"{quant_format.name} read {sorted(arrays)} for {linear.module}, expected "
                         f"{sorted(quant.arrays())}")
    placed = {}
    for name, host in arrays.items():
        want = shapes[f"{path}.{name}"]
        if tuple(host.shape) != want.shape:
            raise ValueError(f"{quant_format.name} read {linear.module}'s {name} with shape {tuple(host.shape)}, "
                             f"expected {want.shape}")
        host = np.ascontiguousarray(host.astype(want.dtype, copy=False))
        where = param_sharding(f"{path}.{name}", want.shape, mesh, config)
        placed[f"{path}.{name}"] = jax.make_array_from_callback(want.shape, where, lambda index, h=host: h[index])
    return placed


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
