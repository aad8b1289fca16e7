"""What one quantized linear layer is once loaded, whatever format stored it, and the protocol of a format.

Legend: K input features, N output features, G rows of K per group (K itself for per-channel), E = 32 // bits.

The engine runs two kinds (pallas_kernels' layouts):
- "int" (AWQ, GPTQ, compressed-tensors pack-quantized, GGUF Q4_0 / Q4_1 / Q8_0), arrays
      qweight i32[K / E, N]   unsigned values packed along K (pallas_kernels/quant_pack.py)
      scales  [K / G, N]      float
      zeros   [K / G, N]      float, in the integer domain: w[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]
      perm    i32[K]          only with act_order: the kernel's row r is checkpoint input perm[r], so the matmul
                              reads x[:, perm] (GPTQ desc_act, rows sorted by group at load)
- "fp8" (compressed-tensors float-quantized), arrays
      weight  float8_e4m3fn [K, N]
      scales  f32 [1, N]      per channel (a per-tensor scale is broadcast): w = weight * scales

Scales and zeros are stored in the model's dtype when it is float32, else in float16 (the formats' own scale
dtype, so GGUF's and AutoAWQ's fp16 scales stay exact).
"""

import dataclasses
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

if TYPE_CHECKING:  # the loader builds quantized models: a runtime import would be a cycle
    from jaxllm.loading.loader import TensorSource

KINDS = ("int", "fp8")


@dataclasses.dataclass(frozen=True)
class LinearQuant:
    """How one linear is quantized. Parts of a fused projection (q/k/v, gate/up) must agree."""

    kind: Literal["int", "fp8"]
    bits: int  # 4 or 8
    group_size: int  # rows of K per scale; per-channel is resolved to K by the format
    act_order: bool = False  # int only: a `perm` array comes with the weights
    dynamic_activations: bool = False  # fp8 only: the checkpoint quantizes inputs per token at run time

    def arrays(self) -> tuple[str, ...]:
        """The names of this linear's arrays, as above."""
        if self.kind == "fp8":
            return ("weight", "scales")
        return ("qweight", "scales", "zeros") + (("perm",) if self.act_order else ())

    def shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        k, n = in_features, out_features
        if self.kind == "fp8":
            return {"weight": (k, n), "scales": (1, n)}
        shapes = {"qweight": (k * self.bits // 32, n), "scales": (k // self.group_size, n),
                  "zeros": (k // self.group_size, n)}
        return shapes | ({"perm": (k,)} if self.act_order else {})


class QuantFormat(Protocol):
    """A checkpoint format's reader of quantized linears, addressed by the HF module name of the linear
    ("model.layers.0.self_attn.q_proj"); every other tensor is read as today, by name, from the TensorSource."""

    name: str  # "awq", "gptq", "compressed-tensors", "gguf", ...: what /v1/models and the start-up log report
    # When the parts of a fused projection (q/k/v, gate/up) are stored differently: True reads them all as dense
    # weights through the TensorSource's HF names (GGUF's source dequantizes); False makes it a ValueError.
    can_dequantize: bool

    def linear_quant(self, module: str, in_features: int, out_features: int) -> LinearQuant | None:
        """How `module` is stored; None when it is not quantized (an `ignore` entry, a GGUF F16 tensor, ...)."""
        ...

    def tensor_names(self, module: str) -> tuple[str, ...]:
        """The checkpoint tensors `read` consumes for a quantized `module`, so the generic loader skips them."""
        ...

    def read(self, source: "TensorSource", module: str, quant: LinearQuant, in_features: int,
             out_features: int) -> dict[str, np.ndarray]:
        """The module's arrays on the host, named and shaped as `quant.shapes(...)` says; ValueError naming the
        tensor or field on anything malformed."""
        ...
