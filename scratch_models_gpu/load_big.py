import json, os, resource, time
import jax, jax.numpy as jnp, numpy as np, ml_dtypes
from safetensors.numpy import save_file
from jaxllm.loading import load_model
L = 8
hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8, "torch_dtype": "bfloat16"}
d = "/tmp/big"; os.makedirs(d, exist_ok=True)
json.dump(hf, open(f"{d}/config.json", "w"))
rng = np.random.default_rng(0)
def t(*s): return (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
t0 = time.time()
shard = {"model.embed_tokens.weight": t(128256, 4096), "lm_head.weight": t(128256, 4096), "model.norm.weight": t(4096)}
save_file(shard, f"{d}/model-0.safetensors"); wm = {k: "model-0.safetensors" for k in shard}
for i in range(L):
    p = f"model.layers.{i}."
    shard = {p + "self_attn.q_proj.weight": t(4096, 4096), p + "self_attn.k_proj.weight": t(1024, 4096),
             p + "self_attn.v_proj.weight": t(1024, 4096), p + "self_attn.o_proj.weight": t(4096, 4096),
             p + "mlp.gate_proj.weight": t(14336, 4096), p + "mlp.up_proj.weight": t(14336, 4096),
             p + "mlp.down_proj.weight": t(4096, 14336), p + "input_layernorm.weight": t(4096),
             p + "post_attention_layernorm.weight": t(4096)}
    save_file(shard, f"{d}/model-{i + 1}.safetensors"); wm |= {k: f"model-{i + 1}.safetensors" for k in shard}
json.dump({"weight_map": wm}, open(f"{d}/model.safetensors.index.json", "w"))
size = sum(os.path.getsize(f"{d}/{f}") for f in os.listdir(d)) / 2**30
print(f"wrote {size:.2f} GiB in {time.time() - t0:.1f}s", flush=True)
jax.block_until_ready(jnp.ones(2) * 2)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time(); model, params, cfg = load_model(d); jax.block_until_ready(params)
print(f"load_model: {time.time() - t0:.1f}s ({size / (time.time() - t0):.2f} GiB/s), maxrss growth "
      f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20:.2f} GiB", flush=True)
from safetensors import safe_open
with safe_open(f"{d}/model-3.safetensors", framework="flax") as f:
    ref = f.get_tensor("model.layers.2.mlp.gate_proj.weight")
print("gate_proj equal:", bool((params["layers"][2]["gate_proj"] == ref.T).all()), params["layers"][2]["gate_proj"].dtype)
t0 = time.time(); model, params, cfg = load_model(d); jax.block_until_ready(params)
print(f"second load (page cache warm, compiles cached): {time.time() - t0:.1f}s", flush=True)
