import resource, time, sys
import jax, jax.numpy as jnp, numpy as np
from jaxllm.model_config import ModelConfig
from jaxllm.loading import load_model
from jaxllm.kv_cache import AttentionMetadata, KVCache

hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "rope_theta": 500000.0,
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}
dev = jax.devices()[0]
print(dev, flush=True)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
model, params, config = load_model(ModelConfig.from_hf(hf), load_format="dummy", dtype="bfloat16",
                                   attention_backend=sys.argv[1] if len(sys.argv) > 1 else "auto")
jax.block_until_ready(params)
print(f"dummy 8B params: {time.time() - t:.1f}s, device bytes in use {dev.memory_stats()['bytes_in_use'] / 2**30:.2f} GiB, "
      f"host maxrss growth {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20:.2f} GiB", flush=True)
t = time.time(); p2 = load_model(ModelConfig.from_hf(hf), load_format="dummy", dtype="bfloat16", seed=1)[1]
jax.block_until_ready(p2); print(f"second dummy (cached compiles): {time.time() - t:.1f}s", flush=True); del p2

B, P, T = 16, 256, 512
cache = KVCache.create(num_layers=32, num_blocks=P, block_size=B, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
step = jax.jit(model.__call__, donate_argnums=1)
pos = np.arange(T)
table = np.arange(1, 1 + T // B)
md = AttentionMetadata(positions=jnp.asarray(pos, jnp.int32), slot_mapping=jnp.asarray(table[pos // B] * B + pos % B, jnp.int32),
                       block_tables=jnp.asarray(np.pad(table, (0, 64 - len(table)))[None], jnp.int32),
                       seq_lens=jnp.asarray([T], jnp.int32), query_start_loc=jnp.asarray([0, T], jnp.int32))
ids = jnp.asarray(np.random.default_rng(0).integers(0, 128256, T), jnp.int32)
t = time.time(); cache, logits = step(params, cache, ids, md, jnp.asarray([T - 1], jnp.int32)); logits.block_until_ready()
print(f"prefill T={T} compile+run {time.time() - t:.1f}s; logits finite {bool(jnp.isfinite(logits).all())} std {float(logits.std()):.3f}", flush=True)
for _ in range(2):
    t = time.time(); cache, logits = step(params, cache, ids, md, jnp.asarray([T - 1], jnp.int32)); logits.block_until_ready()
    print(f"prefill run {1000 * (time.time() - t):.1f} ms", flush=True)
