"""Which quantization format a Hugging Face checkpoint directory holds, from config.json's `quantization_config`,
checked against what the user asked for (`quantization=`)."""

from jaxllm.quantization.linear_quant import QuantFormat


def detect_format(hf_config: dict, requested: str | None) -> QuantFormat | None:
    """The checkpoint's format reader, or None for an unquantized checkpoint. `requested` (None: take the
    checkpoint's) must agree with it, vLLM's aliases accepted; ValueError naming both otherwise."""
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method is None and requested is None:
        return None
    raise ValueError(f"quantization {requested or method!r} is not supported yet")
