"""Which linears of a model are stored quantized, and how: asked of a checkpoint's format, or made up for
`load_format="dummy"` with a quantization method. -> {checkpoint-layout path ("layers.3.attn.q_proj"): LinearQuant},
the dense linears absent.

The parts of a fused projection (q/k/v, gate/up: models/fusion.py) run as one matmul, so they must be stored alike.
When they are not, a format that can dequantize has them all read dense; any other is a ValueError naming the layer.
The vocabulary head is one of the linears when it is untied (compressed-tensors without "lm_head" in `ignore`,
GPTQModel's `lm_head: true`, a GGUF Q8_0 `output.weight`); a tied head is the embedding, which stays dense. Dummy
weights keep the head dense, as the tools do by default.
"""

import logging

from jaxllm.config import quantization_method
from jaxllm.model_config import ModelConfig
from jaxllm.models.fusion import FusedProjection
from jaxllm.quantization.linear_quant import LinearQuant, QuantFormat

logger = logging.getLogger(__name__)

# The group size each method's tools write by default (AutoAWQ, AutoGPTQ, llm-compressor's W4A16; GGUF's blocks).
_DUMMY_GROUP = {"awq": 128, "gptq": 128, "compressed-tensors": 128, "gguf": 32}


def checkpoint_quants(model_cls, config: ModelConfig, quant_format: QuantFormat) -> dict[str, LinearQuant]:
    """How `quant_format` stores each of the model's linears; a ValueError naming the head when the format says it
    is quantized but the model ties it to the embedding."""
    linears = model_cls.linears(config)
    head_path, head = model_cls.head(config)
    if head_path not in linears and quant_format.linear_quant(head.module, head.in_features,
                                                              head.out_features) is not None:
        raise ValueError(f"{head.module}: {quant_format.name} stores it quantized, but the model ties it to the "
                         f"embedding (tie_word_embeddings), which is never quantized")
    quants = {path: quant_format.linear_quant(linear.module, linear.in_features, linear.out_features)
              for path, linear in linears.items()}
    for i in range(config.num_layers):
        for fusion in model_cls.fused_projections:
            _agree(quants, f"layers.{i}.", fusion, quant_format)
    return {path: quant for path, quant in quants.items() if quant is not None}


def _agree(quants: dict[str, LinearQuant | None], prefix: str, fusion: FusedProjection,
           quant_format: QuantFormat) -> None:
    paths = [prefix + part for part in fusion.parts]
    if not all(path in quants for path in paths) or len({quants[path] for path in paths}) == 1:
        return  # not a fusion of linears (biases), or stored alike
    stored = ", ".join(f"{path}: {quants[path]}" for path in paths)
    if not quant_format.can_dequantize:
        raise ValueError(f"{prefix}{fusion.name}: its parts are stored differently ({stored}); {quant_format.name} "
                         f"cannot read them dense, and one fused matmul needs them alike")
    logger.info("%s%s: parts stored differently (%s): read dense", prefix, fusion.name, stored)
    for path in paths:
        quants[path] = None


def dummy_quants(model_cls, config: ModelConfig, quantization: str) -> dict[str, LinearQuant]:
    """Every decoder linear as `quantization` (a method of jaxllm.config, or an alias) usually stores it: int4 in
    groups of 128 (GGUF: 32; per-channel where the group does not divide K), or fp8 with per-channel scales; the
    head dense."""
    method = quantization_method(quantization)
    head_path, _ = model_cls.head(config)
    return {path: _dummy_quant(method, linear.in_features) for path, linear in model_cls.linears(config).items()
            if path != head_path}


def _dummy_quant(method: str, in_features: int) -> LinearQuant:
    if method == "fp8":
        return LinearQuant("fp8", 8, in_features)
    group = _DUMMY_GROUP[method]
    return LinearQuant("int", 4, group if in_features % group == 0 else in_features)
