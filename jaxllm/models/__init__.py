"""Model definitions. `build_model(config)` picks the implementation from `config.architecture`."""

from jaxllm.models.llama import LlamaForCausalLM
from jaxllm.models.registry import MODELS, build_model, get_model_class

__all__ = ["MODELS", "LlamaForCausalLM", "build_model", "get_model_class"]
