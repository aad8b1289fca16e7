import resource, sys, time
import jax
from jaxllm.model_config import ModelConfig
from jaxllm.loading import load_model
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "torch_dtype": "bfloat16"}
jax.block_until_ready(jax.numpy.ones(3) * 2)
print(f"after init {rss():.2f} GiB", flush=True)
for layers in (2, 32):
    p = load_model(ModelConfig.from_hf(hf | {"num_hidden_layers": layers}), load_format="dummy", dtype="bfloat16")[1]
    jax.block_until_ready(p)
    print(f"{layers} layers: maxrss {rss():.2f} GiB, device {jax.devices()[0].memory_stats()['bytes_in_use'] / 2**30:.2f} GiB", flush=True)
    del p
