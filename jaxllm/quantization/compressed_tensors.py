"""llm-compressor's checkpoints (`quant_method: compressed-tensors`): which scheme each linear has, and reading it.

Per linear (K input features, N output features, G group size, E = 32 // bits, HF's [N, K] orientation):
- `pack-quantized` (int 4 / 8):
      weight_packed     i32[N, K / E]        packed along K, plain order; each value stored + 2**(bits - 1)
      weight_scale      [N, K / G] or [N, 1] (channel)
      weight_zero_point i32[N / E, K / G]    asymmetric only: packed along N, stored + 2**(bits - 1)
      weight_g_idx      i32[K]               actorder "group" only
      weight_shape      i[2]                 [N, K]
- `naive-quantized` (int): weight int8[N, K] (signed), weight_scale, optional weight_zero_point int8 like it
- `float-quantized` (fp8): weight float8_e4m3fn[N, K], weight_scale [N, 1] (channel) or [1] / [] (tensor)
  w[n, k] = (q[n, k] - zp[n, g]) * s[n, g] with q and zp signed; w = weight * scale for fp8.
"""

import dataclasses
import re

import ml_dtypes
import numpy as np

from jaxllm.loading.loader import TensorSource
from jaxllm.quantization.checkpoint_reading import (
    check_bits,
    contiguous_groups,
    int_arrays,
    read_tensor,
    resolve_group_size,
    unpack_words,
)
from jaxllm.quantization.linear_quant import LinearQuant

FORMATS = ("pack-quantized", "naive-quantized", "float-quantized")
_FLOAT_DTYPES = (np.float16, np.float32, "bfloat16")
_PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
_UNPACKED = ("weight", "weight_scale", "weight_zero_point", "weight_g_idx")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One config group's weights, validated: what its linears are."""

    field: str  # "quantization_config.config_groups.<key>", for messages
    targets: tuple[str, ...]
    kind: str  # "int" or "fp8"
    bits: int
    strategy: str  # int: "group" | "channel"; fp8: "channel" | "tensor"
    group_size: int | None
    symmetric: bool
    act_order: bool  # int: the checkpoint has weight_g_idx
    dynamic_activations: bool  # fp8: inputs quantized per token at run time

    @classmethod
    def from_config(cls, fmt: str, key: str, group: dict) -> "Scheme":
        field = f"quantization_config.config_groups.{key}"
        weights = group.get("weights")
        if not weights:
            raise ValueError(f"{field}.weights is missing")
        wtype = weights.get("type", "int")
        strategy = weights.get("strategy")
        actorder = weights.get("actorder")
        acts = group.get("input_activations")
        if fmt == "float-quantized":
            if wtype != "float" or weights.get("num_bits") != 8:
                raise ValueError(f"{field}.weights must be 8-bit float for the float-quantized format, got type "
                                 f"{wtype!r} num_bits {weights.get('num_bits')!r}")
            if strategy not in ("channel", "tensor"):
                raise ValueError(f"{field}.weights.strategy = {strategy!r} is not supported for fp8 weights; "
                                 "expected 'channel' or 'tensor'")
            dynamic = acts is not None
            if acts is not None and not (acts.get("dynamic") is True and acts.get("strategy") == "token"):
                raise ValueError(f"{field}.input_activations = {acts!r} is not supported; fp8 inputs are "
                                 "quantized dynamically per token (dynamic: true, strategy: token) or not at all")
            return cls(field, _targets(group, field), "fp8", 8, strategy, None, True, False, dynamic)
        if wtype != "int":
            raise ValueError(f"{field}.weights.type = {wtype!r} is not supported by the {fmt} format")
        if acts is not None:
            raise ValueError(f"{field}.input_activations is set: quantized activations with int weights (W8A8) "
                             "are not supported, only weight-only int schemes")
        bits = check_bits(weights.get("num_bits"), f"{field}.weights.num_bits")
        if strategy not in ("group", "channel"):
            raise ValueError(f"{field}.weights.strategy = {strategy!r} is not supported for int weights; "
                             "expected 'group' or 'channel'")
        if actorder not in (None, False, True, "group", "weight", "static", "dynamic"):
            raise ValueError(f"{field}.weights.actorder = {actorder!r} is not supported")
        group_size = weights.get("group_size") if strategy == "group" else None
        if strategy == "group" and group_size is None:
            raise ValueError(f"{field}.weights.group_size is missing for the group strategy")
        # "weight" order reorders rows only while quantizing: groups stay contiguous and no g_idx is saved.
        act_order = strategy == "group" and actorder in (True, "group", "dynamic")
        return cls(field, _targets(group, field), "int", bits, strategy, group_size,
                   bool(weights.get("symmetric", True)), act_order, False)

    def linear_quant(self, module: str, in_features: int) -> LinearQuant:
        if self.kind == "fp8":
            return LinearQuant("fp8", 8, in_features, dynamic_activations=self.dynamic_activations)
        group = resolve_group_size(self.group_size, in_features, f"{self.field}.weights.group_size", module)
        e = 32 // self.bits
        if in_features % e:
            raise ValueError(f"{module}'s {in_features} input features do not pack into words of {e}")
        return LinearQuant("int", self.bits, group, act_order=self.act_order and group != in_features)


def _targets(group: dict, field: str) -> tuple[str, ...]:
    targets = group.get("targets")
    if not targets:
        raise ValueError(f"{field}.targets is missing")
    return tuple(targets)


def _rank(target: str) -> int:
    return 0 if target == "Linear" else 1 if target.startswith("re:") else 2


def _matches(pattern: str, module: str) -> bool:
    """compressed-tensors' matching: "re:" entries are regexes from the start of the module name; "Linear" is the
    class every module asked about here has; anything else is a module name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == "Linear" or pattern == module


@dataclasses.dataclass(frozen=True)
class CompressedTensorsFormat:
    fmt: str
    schemes: tuple[Scheme, ...]
    ignore: tuple[str, ...]
    name: str = "compressed-tensors"
    can_dequantize: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "CompressedTensorsFormat":
        fmt = config.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"quantization_config.format = {fmt!r} is not supported; expected one of {FORMATS}")
        groups = config.get("config_groups") or {}
        if not groups:
            raise ValueError("quantization_config.config_groups is missing")
        for key, group in groups.items():
            if group.get("format", fmt) != fmt:
                raise ValueError(f"quantization_config.config_groups.{key}.format = {group['format']!r}: "
                                 "mixed formats are not supported")
        schemes = tuple(Scheme.from_config(fmt, key, group) for key, group in groups.items())
        return cls(fmt, schemes, tuple(config.get("ignore") or ()))

    def _scheme(self, module: str) -> Scheme | None:
        """The module's scheme: a target naming it beats a regex, a regex beats the class name, as vLLM ranks them."""
        if any(_matches(p, module) for p in self.ignore):
            return None

        ranked = [(-max(_rank(t) for t in s.targets if _matches(t, module)), i) for i, s in enumerate(self.schemes)
                  if any(_matches(t, module) for t in s.targets)]
        return self.schemes[min(ranked)[1]] if ranked else None  # ties: the first group

    def linear_quant(self, module: str, in_features: int, out_features: int) -> LinearQuant | None:
        scheme = self._scheme(module)
        return None if scheme is None else scheme.linear_quant(module, in_features)

    def tensor_names(self, module: str) -> tuple[str, ...]:
        scheme = self._scheme(module)
        if scheme is None:
            return ()
        return tuple(f"{module}.{t}" for t in (_PACKED if self.fmt == "pack-quantized" else _UNPACKED))

    def read(self, source: TensorSource, module: str, quant: LinearQuant, in_features: int,
             out_features: int) -> dict[str, np.ndarray]:
        scheme = self._scheme(module)
        assert scheme is not None, module
        k, n = in_features, out_features
        if quant.kind == "fp8":
            return _read_fp8(source, module, scheme, k, n)
        groups, bits = k // quant.group_size, quant.bits
        offset = 2 ** (bits - 1)
        if self.fmt == "pack-quantized":
            e = 32 // bits
            packed = read_tensor(source, f"{module}.weight_packed", (n, k // e), (np.int32,))
            values = unpack_words(packed, bits, axis=1).T  # [K, N], unsigned
            shape_name = f"{module}.weight_shape"
            if shape_name in source.keys() and [int(v) for v in source.read(shape_name)] != [n, k]:
                raise ValueError(f"checkpoint tensor {shape_name!r} = {source.read(shape_name).tolist()}, "
                                 f"expected {[n, k]}")
        else:
            values = read_tensor(source, f"{module}.weight", (n, k), (np.int8,)).astype(np.int32).T + offset
            if values.min() < 0 or values.max() >= 2**bits:
                raise ValueError(f"checkpoint tensor {module + '.weight'!r} has values outside {bits} bits")
        scales = read_tensor(source, f"{module}.weight_scale", (n, groups), _FLOAT_DTYPES).T  # [K / G, N]
        zeros = np.full((groups, n), offset)
        zp_name = f"{module}.weight_zero_point"
        if not scheme.symmetric:
            if self.fmt == "pack-quantized":
                # Packed along N, rounded up to whole words as pack_to_int32 pads.
                zp = read_tensor(source, zp_name, (-(-n * bits // 32), groups), (np.int32,))
                zeros = unpack_words(zp, bits, axis=0)[:n].T
            else:
                zeros = read_tensor(source, zp_name, (n, groups), (np.int8, np.int32)).astype(np.int32).T + offset
        perm = None
        if quant.act_order:
            g_name = f"{module}.weight_g_idx"
            g_idx = read_tensor(source, g_name, (k,), (np.int32, np.int64)).astype(np.int64)
            perm = contiguous_groups(g_idx, groups, g_name)
        return int_arrays(values, scales, zeros, bits, perm)


def _read_fp8(source: TensorSource, module: str, scheme: Scheme, k: int, n: int) -> dict[str, np.ndarray]:
    weight = read_tensor(source, f"{module}.weight", (n, k), (ml_dtypes.float8_e4m3fn,))
    scale_name = f"{module}.weight_scale"
    if scheme.strategy == "channel":
        scales = read_tensor(source, scale_name, (n, 1), _FLOAT_DTYPES).reshape(1, n)
    else:
        # llm-compressor writes a per-tensor scale as [1]; a 0-d scalar means the same.
        scalar = scale_name in source.keys() and tuple(source.shape(scale_name)) == ()
        scales = read_tensor(source, scale_name, () if scalar else (1,), _FLOAT_DTYPES)
        scales = np.broadcast_to(scales.reshape(1, 1), (1, n))
    return {"weight": np.ascontiguousarray(weight.T), "scales": scales.astype(np.float32)}
