"""AutoGPTQ / GPTQModel checkpoints (`quant_method: gptq`).

Per linear (K input features, N output features, G group size, E = 32 // bits):
    qweight i32[K / E, N]      packed along K, plain order (the quantized matmul's own layout)
    qzeros  i32[K / G, N / E]  packed along N, plain order; `checkpoint_format: gptq` (v1) stores zero - 1,
                               `gptq_v2` the zero itself
    scales  f16[K / G, N]
    g_idx   i32[K]             the group of each row: k // G, or any grouping with `desc_act` (act-order)
    w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
Act-order rows are sorted by group at load (stably), so each group is contiguous for the kernel, and the model reads
the activations' columns in that order (`perm`), as vLLM's Marlin path does.
"""

import dataclasses
import re

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

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_OVERRIDES = ("bits", "group_size", "desc_act", "sym")
_FLOAT_DTYPES = (np.float16, np.float32, "bfloat16")


@dataclasses.dataclass(frozen=True)
class GPTQFormat:
    bits: int
    group_size: int  # -1: per channel
    desc_act: bool
    checkpoint_format: str  # "gptq": stored zeros are zero - 1; "gptq_v2": the zeros
    lm_head: bool = False  # GPTQModel's flag: the head is quantized too
    # GPTQModel's `dynamic` {regex: overrides}, in order: a "-:" pattern leaves the modules it matches dense, any
    # other ("+:" or bare) gives them its bits / group_size / desc_act; the first match wins, as vLLM reads it.
    dynamic: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    name: str = "gptq"
    can_dequantize: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "GPTQFormat":
        bits = check_bits(config.get("bits"), "quantization_config.bits")
        checkpoint_format = config.get("checkpoint_format", "gptq")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format = {checkpoint_format!r} is not supported; "
                             f"expected one of {CHECKPOINT_FORMATS}")
        dynamic = tuple((pattern, tuple(_overrides(pattern, overrides).items()))
                        for pattern, overrides in (config.get("dynamic") or {}).items())
        return cls(bits, config.get("group_size", -1), bool(config.get("desc_act", False)), checkpoint_format,
                   bool(config.get("lm_head", False)), dynamic)

    def _module_config(self, module: str) -> dict | None:
        """bits, group_size and desc_act of `module`; None when `dynamic` leaves it dense."""
        base = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act}
        for pattern, overrides in self.dynamic:
            if pattern.startswith("-:"):
                if re.match(pattern[2:], module):
                    return None
            elif re.match(pattern.removeprefix("+:"), module):
                return base | dict(overrides)
        return base

    def linear_quant(self, module: str, in_features: int, out_features: int) -> LinearQuant | None:
        own = self._module_config(module)
        if (module == "lm_head" and not self.lm_head) or own is None:
            return None
        group = resolve_group_size(own["group_size"], in_features, "quantization_config.group_size", module)
        e = 32 // own["bits"]
        if out_features % e or in_features % e:
            raise ValueError(f"{module}'s shape [{in_features}, {out_features}] does not pack into words of {e}")
        # One group has no order to restore (vLLM turns desc_act off for per-channel checkpoints too).
        return LinearQuant("int", own["bits"], group, act_order=bool(own["desc_act"]) and group != in_features)

    def tensor_names(self, module: str) -> tuple[str, ...]:
        return tuple(f"{module}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx"))

    def read(self, source: TensorSource, module: str, quant: LinearQuant, in_features: int,
             out_features: int) -> dict[str, np.ndarray]:
        k, n, e, groups = in_features, out_features, 32 // quant.bits, in_features // quant.group_size
        qweight = read_tensor(source, f"{module}.qweight", (k // e, n), (np.int32,))
        values = unpack_words(qweight, quant.bits, axis=0)  # [K, N]
        qzeros = read_tensor(source, f"{module}.qzeros", (groups, n // e), (np.int32,))
        zeros = unpack_words(qzeros, quant.bits, axis=1)
        if self.checkpoint_format == "gptq":
            # Modulo the field width, as GPTQModel's v1 -> v2 conversion adds one to every field.
            zeros = (zeros + 1) % 2**quant.bits
        scales = read_tensor(source, f"{module}.scales", (groups, n), _FLOAT_DTYPES)
        g_name = f"{module}.g_idx"
        if quant.act_order:
            g_idx = read_tensor(source, g_name, (k,), (np.int32, np.int64)).astype(np.int64)
            return int_arrays(values, scales, zeros, quant.bits, contiguous_groups(g_idx, groups, g_name))
        if g_name in source.keys() and groups > 1:
            g_idx = read_tensor(source, g_name, (k,), (np.int32, np.int64))
            if not np.array_equal(g_idx, np.arange(k) // quant.group_size):
                raise ValueError(f"checkpoint tensor {g_name!r} is not k // group_size, but quantization_config."
                                 "desc_act is false")
        return int_arrays(values, scales, zeros, quant.bits, None)


def _overrides(pattern: str, overrides: dict) -> dict:
    field = f"quantization_config.dynamic[{pattern!r}]"
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"{field} overrides {unknown}; only {_OVERRIDES} are supported")
    if "bits" in overrides:
        check_bits(overrides["bits"], f"{field}.bits")
    return {k: v for k, v in overrides.items() if k != "sym"}  # sym changes nothing a reader does: zeros are stored
