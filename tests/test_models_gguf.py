"""The default model end to end through the loader: SmolLM2-135M-Instruct from its GGUF file (30 layers, 9/3 heads,
tied embeddings, Q4_1 dequantized to float32) against transformers' own GGUF path (tests/fixtures/smollm2_gguf.json).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.default_model import default_model_path
from jaxllm.kv_cache import AttentionMetadata, KVCache
from jaxllm.loading import load_model

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "smollm2_gguf.json"
BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS = 16, 12, 8


def test_default_gguf_model_greedy_matches_transformers():
    ref = json.loads(REFERENCE.read_text())
    model, config = load_model(default_model_path(), dtype="float32")
    assert (config.num_layers, config.num_q_heads, config.num_kv_heads, config.tie_word_embeddings) == (30, 9, 3, True)
    assert model.lm_head is None and model.embed.weight.dtype == jnp.float32

    cache = KVCache.create(num_layers=config.num_layers, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                           num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    table = np.random.default_rng(0).permutation(np.arange(1, NUM_BLOCKS))[:MAX_BLOCKS]  # block 0 stays null
    step = jax.jit(lambda model, *args: model.step(*args), donate_argnums=1)

    def run(cache, tokens: np.ndarray, start: int, num_tokens: int, decode_only: bool):
        pos = np.arange(start, start + len(tokens))
        pad = num_tokens - len(tokens)
        metadata = AttentionMetadata(
            positions=jnp.asarray(np.pad(pos, (0, pad)), jnp.int32),
            slot_mapping=jnp.asarray(np.pad(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE, (0, pad)),
                                     jnp.int32),
            block_tables=jnp.asarray(table[None], jnp.int32),
            seq_lens=jnp.asarray([start + len(tokens)], jnp.int32),
            query_start_loc=jnp.asarray([0, len(tokens)], jnp.int32),
            decode_only=decode_only)
        token_ids = jnp.asarray(np.pad(tokens, (0, pad)), jnp.int32)
        cache, logits = step(model, cache, token_ids, metadata, jnp.asarray([len(tokens) - 1], jnp.int32))
        return cache, np.asarray(logits[0])

    prompt = np.asarray(ref["chat_prompt_ids"])
    cache, logits = run(cache, prompt, 0, 64, False)
    top = np.argsort(-logits)[:10]
    np.testing.assert_array_equal(top, ref["last_logits_top10_ids"])
    np.testing.assert_allclose(logits[top], ref["last_logits_top10_values"], rtol=1e-4)
    generated = [int(np.argmax(logits))]
    for _ in range(len(ref["greedy_new_ids"]) - 1):
        cache, logits = run(cache, np.asarray(generated[-1:]), len(prompt) + len(generated) - 1, 1, True)
        generated.append(int(np.argmax(logits)))
    assert generated == ref["greedy_new_ids"]
