"""HF `architectures` name -> model class. Adding a family is one row here plus its module."""

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


def build_model(config: ModelConfig, *, mesh=None, kernel_backend: str = "auto"):
    """The model object for a config: `kv_cache, logits = model(params, kv_cache, token_ids, metadata)`."""
    return get_model_class(config.architecture)(config=config, mesh=mesh, kernel_backend=kernel_backend)
