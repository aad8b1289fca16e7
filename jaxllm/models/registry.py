"""HF `architectures` name -> model class. Adding a family is one row here plus its module."""

import jax.numpy as jnp
from flax import nnx

from jaxllm.model_config import ModelConfig
from jaxllm.models.llama import LlamaForCausalLM

MODELS: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(architecture: str) -> type:
    if architecture not in MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(MODELS)}")
    return MODELS[architecture]


def build_model(config: ModelConfig, *, dtype=jnp.float32, mesh=None, kernel_backend: str = "auto", quants=None,
                quantization: str | None = None):
    """The abstract model of a config (`nnx.eval_shape`: its params are shapes, no memory), for a loader to fill
    (models/state.py fill); `quants` {checkpoint-layout path: LinearQuant} its quantized linears, named by the
    format `quantization`."""
    cls = get_model_class(config.architecture)
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, mesh=mesh, kernel_backend=kernel_backend, quants=quants,
                                      quantization=quantization))
