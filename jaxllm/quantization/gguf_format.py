"""GGUF's Q4_0, Q4_1 and Q8_0 tensors served packed (group-32 affine int4 / int8) through the quantized matmul.

Legend: N output features (the tensor's rows), K input features, B = K / 32 blocks per row.

A block holds 32 consecutive weights of one row along K (llama.cpp's ggml-common.h, block_q4_0 / block_q4_1 /
block_q8_0), so a block is a group of the canonical layout (linear_quant.py) and nothing is dequantized:
    Q4_0  f16 d, 16 bytes of nibbles   w = d * (q - 8)      scales d, zeros 8
    Q4_1  f16 d, f16 m, 16 bytes       w = d * q + m        scales d, zeros -m / d
    Q8_0  f16 d, 32 int8               w = d * q            values q + 128, scales d, zeros 128
Byte j of the nibbles holds element j in its low half and element j + 16 in its high half. Every other type (F16,
F32, the K-quants, ...) stays a dense tensor, dequantized by the checkpoint's source as before.
Q4_0's and Q8_0's weights come back exactly, in f32 scales as in f16 ones; Q4_1's zero -m / d costs one f32 rounding,
and in f16 (the scale dtype of a bf16 / f16 model) up to 2**-8 of a quantization step (|zero| < 16 in real blocks).
"""

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from jaxllm.quantization.linear_quant import LinearQuant, QuantFormat
from pallas_kernels.quant_pack import pack_int

if TYPE_CHECKING:  # the gguf package is imported only when a GGUF file is read (loading/model_loader.py)
    from gguf import GGMLQuantizationType

    from jaxllm.loading.gguf import GGUFTensors

GROUP = 32  # QK4_0 = QK4_1 = QK8_0
_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_BLOCK_BYTES = {"Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q8_0": 2 + 32}
_EMBEDDING = "model.embed_tokens.weight"  # a gathered table, not a matmul: always dense


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 field at byte `at` of every block, uint8 [N, B, bytes] -> f32 [N, B]."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [N, B, 16] -> uint8 [N, B, 32]: the low halves are elements 0..15, the high halves 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_blocks(raw: np.ndarray, qtype: "GGMLQuantizationType") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored rows uint8 [N, B * block bytes] -> (values uint8 [N, K], scales f32 [N, B], zeros f32 [N, B]) with
    w = (values - zeros) * scales per block."""
    if qtype.name not in _BITS:
        raise ValueError(f"GGUF type {qtype.name} is not served packed (only {sorted(_BITS)})")
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BLOCK_BYTES[qtype.name])
    d = _f16(blocks, 0)
    if qtype.name == "Q4_0":
        values, zeros = _nibbles(blocks[..., 2:]), np.full_like(d, 8)
    elif qtype.name == "Q4_1":
        m = _f16(blocks, 2)
        values = _nibbles(blocks[..., 4:])
        # A d == 0 block is constant (w = m whatever q says; q need not be 0 when d underflowed f16): store q = 0
        # with scale 1 and zero -m, exact in f16 since m is.
        constant = d == 0
        values[constant] = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            zeros = np.where(constant, -m, -m / d)
        d = np.where(constant, np.float32(1), d)
    else:
        values = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zeros = np.full_like(d, 128)
    return values.reshape(n, -1), d, zeros


def packed_arrays(raw: np.ndarray, qtype: "GGMLQuantizationType") -> dict[str, np.ndarray]:
    """Stored rows uint8 [N, B * block bytes] -> the canonical qweight i32[K / E, N], scales and zeros f32 [B, N]."""
    values, scales, zeros = decode_blocks(raw, qtype)
    return {"qweight": pack_int(values.T, _BITS[qtype.name]), "scales": np.ascontiguousarray(scales.T),
            "zeros": np.ascontiguousarray(zeros.T)}


@dataclasses.dataclass(frozen=True)
class GGUFFormat:
    """The QuantFormat of a GGUF file: Q4_0 / Q4_1 / Q8_0 linears packed, the rest read densely by the source."""

    tensors: "GGUFTensors"
    name: str = "gguf"
    can_dequantize: bool = True  # a fused projection with mixed types reads densely, as every GGUF file did

    def linear_quant(self, module: str, in_features: int, out_features: int) -> LinearQuant | None:
        weight = module + ".weight"
        if weight == _EMBEDDING or weight not in self.tensors:
            return None
        bits = _BITS.get(self.tensors.tensor_type(weight).name)
        if bits is None:
            return None
        _check_shape(self.tensors, weight, in_features, out_features)
        return LinearQuant("int", bits, GROUP)

    def tensor_names(self, module: str) -> tuple[str, ...]:
        return (module + ".weight",)  # a bias (qwen2's q/k/v) stays dense: the generic loader reads it

    def read(self, source, module: str, quant: LinearQuant, in_features: int,
             out_features: int) -> dict[str, np.ndarray]:
        """Canonical arrays [K / E, N], [B, N], [B, N] (scales and zeros f32). The blocks come from the checkpoint's
        own tensors: `source` is the generic loader's view, which dequantizes."""
        del source
        weight = module + ".weight"
        if weight not in self.tensors:
            raise ValueError(f"the GGUF file has no tensor {weight}")
        stored = self.linear_quant(module, in_features, out_features)
        if quant != stored:
            raise ValueError(f"{weight} is stored as {self.tensors.tensor_type(weight).name} ({stored}), it cannot "
                             f"be read as {quant}")
        return packed_arrays(self.tensors.blocks(weight), self.tensors.tensor_type(weight))


def _check_shape(tensors: "GGUFTensors", weight: str, in_features: int, out_features: int) -> None:
    if tensors.shape(weight) != (out_features, in_features):
        raise ValueError(f"GGUF tensor {weight} has shape {tensors.shape(weight)}, the model expects "
                         f"{(out_features, in_features)} ([out, in])")


def gguf_quant_format(checkpoint) -> QuantFormat | None:
    """The reader of `checkpoint`'s (a GGUFCheckpoint) packed linears; None when none is stored packed."""
    tensors = checkpoint.tensors
    packed = any(name != _EMBEDDING and len(tensors.shape(name)) == 2 and tensors.tensor_type(name).name in _BITS
                 for name in tensors.keys())
    return GGUFFormat(tensors) if packed else None
