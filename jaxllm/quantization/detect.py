"""Which quantization format a Hugging Face checkpoint directory holds, from config.json's `quantization_config`,
checked against what the user asked for (`quantization=`)."""

from jaxllm.config import quantization_method
from jaxllm.quantization.awq import AWQFormat
from jaxllm.quantization.compressed_tensors import CompressedTensorsFormat
from jaxllm.quantization.gptq import GPTQFormat
from jaxllm.quantization.linear_quant import QuantFormat

_READERS = {"awq": AWQFormat.from_config, "gptq": GPTQFormat.from_config,
            "compressed-tensors": CompressedTensorsFormat.from_config}


def detect_format(hf_config: dict, requested: str | None) -> QuantFormat | None:
    """The checkpoint's format reader, or None for an unquantized checkpoint. `requested` (None: take the
    checkpoint's) must agree with it, vLLM's aliases accepted; ValueError naming both otherwise."""
    wanted = quantization_method(requested)
    if wanted == "gguf":
        raise ValueError("quantization='gguf' needs a .gguf file; this checkpoint is a safetensors directory")
    config = hf_config.get("quantization_config")
    if config is None:
        if wanted is None:
            return None
        raise ValueError(f"quantization={requested!r} was asked for, but config.json has no quantization_config: "
                         "the checkpoint is not quantized")
    method = config.get("quant_method")
    if method not in _READERS:
        raise ValueError(f"quantization_config.quant_method = {method!r} is not supported; supported: "
                         f"{sorted(_READERS)}")
    if wanted is not None and wanted != method:
        raise ValueError(f"quantization={requested!r} disagrees with the checkpoint's quantization_config."
                         f"quant_method {method!r}")
    return _READERS[method](config)
