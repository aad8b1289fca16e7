"""AutoAWQ's GEMM checkpoints (`quant_method: awq`, `version: gemm`).

Per linear (K input features, N output features, G group size, E = 32 // bits):
    qweight i32[K, N / E]   packed along N: field i of word (k, c) holds column c*E + ORDER[i]
    qzeros  i32[K / G, N / E]  the zero points, packed the same way
    scales  f16[K / G, N]
    w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]
AutoAWQ's `WQLinear_GEMM.from_linear` writes the interleaved order so its CUDA kernel can dequantize eight values
with a few shifts; we undo it at load and repack along K (pallas_kernels/quant_pack.py).
"""

import dataclasses

import numpy as np

from jaxllm.loading.loader import TensorSource
from jaxllm.quantization.checkpoint_reading import check_bits, int_arrays, read_tensor, resolve_group_size, unpack_words
from jaxllm.quantization.linear_quant import LinearQuant

# AutoAWQ's 4-bit order; 8 bits as vLLM's marlin_utils undo it (AutoAWQ itself packs only 4 bits).
ORDER = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}
_FLOAT_DTYPES = (np.float16, np.float32, "bfloat16")


def _first(config: dict, keys: tuple[str, ...], default=None):
    """AutoAWQ's older configs say `w_bit` / `q_group_size`, newer ones `bits` / `group_size` (vLLM reads both)."""
    return next((config[k] for k in keys if k in config), default)


@dataclasses.dataclass(frozen=True)
class AWQFormat:
    bits: int
    group_size: int  # -1: per channel
    # False: symmetric. AutoAWQ's GEMM packer always packs zeros, so such a checkpoint may carry qzeros (then read)
    # or not (then every zero is 2**(bits - 1), the middle of the range).
    zero_point: bool
    modules_to_not_convert: tuple[str, ...] = ()
    name: str = "awq"
    can_dequantize: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "AWQFormat":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version = {config.get('version')!r} is not supported; AWQ "
                             "checkpoints are read in AutoAWQ's GEMM layout (version 'gemm')")
        bits = check_bits(_first(config, ("bits", "w_bit")), "quantization_config.bits")
        group_size = _first(config, ("group_size", "q_group_size"), -1)
        return cls(bits, group_size, bool(config.get("zero_point", True)),
                   tuple(config.get("modules_to_not_convert") or ()))

    def linear_quant(self, module: str, in_features: int, out_features: int) -> LinearQuant | None:
        # AutoAWQ never quantizes the head; vLLM skips a module whose name contains a not-convert entry.
        if module == "lm_head" or any(skip in module for skip in self.modules_to_not_convert):
            return None
        group = resolve_group_size(self.group_size, in_features, "quantization_config.group_size", module)
        e = 32 // self.bits
        if out_features % e or in_features % e:
            raise ValueError(f"{module}'s shape [{in_features}, {out_features}] does not pack into words of {e}")
        return LinearQuant("int", self.bits, group)

    def tensor_names(self, module: str) -> tuple[str, ...]:
        return tuple(f"{module}.{t}" for t in ("qweight", "qzeros", "scales"))

    def read(self, source: TensorSource, module: str, quant: LinearQuant, in_features: int,
             out_features: int) -> dict[str, np.ndarray]:
        k, n, e, groups = in_features, out_features, 32 // quant.bits, in_features // quant.group_size
        qweight = read_tensor(source, f"{module}.qweight", (k, n // e), (np.int32,))
        values = unpack_words(qweight, quant.bits, axis=1, order=ORDER[quant.bits])  # [K, N]
        scales = read_tensor(source, f"{module}.scales", (groups, n), _FLOAT_DTYPES)
        qzeros_name = f"{module}.qzeros"
        if self.zero_point or qzeros_name in source.keys():
            qzeros = read_tensor(source, qzeros_name, (groups, n // e), (np.int32,))
            zeros = unpack_words(qzeros, quant.bits, axis=1, order=ORDER[quant.bits])
        else:
            zeros = np.full((groups, n), 2 ** (quant.bits - 1))
        return int_arrays(values, scales, zeros, quant.bits, None)
