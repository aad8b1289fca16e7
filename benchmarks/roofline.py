"""The card's ceilings, measured in the same run as the figures they judge: copy and read bandwidth, bf16 matmul rate.

Each loops on the device (a while loop or chained products) so host synchronisation stays out of the figure.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxllm.runtime import kv_sizing


def copy_bandwidth() -> float:
    """A 4 GiB f32 array scaled in place 20 times in a while loop (its ~10 us per iteration is < 1% here)."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)
    run = jax.jit(lambda x: lax.fori_loop(0, 20, lambda _, x: x * 1.0001, x))
    jax.block_until_ready(run(x))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append((time.perf_counter() - start) / 20)
    return 2 * x.nbytes / float(np.median(times))


def read_bandwidth() -> float:
    """A 4 GiB f32 array summed 20 times in a while loop: the ceiling of a read-only stream, which decode is."""
    x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)
    run = jax.jit(lambda x: lax.fori_loop(0, 20, lambda _, acc: acc + jnp.sum(x + acc * 0), jnp.float32(0)))
    jax.block_until_ready(run(x))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append((time.perf_counter() - start) / 20)
    return x.nbytes / float(np.median(times))


def matmul_rate() -> float:
    """bf16 8192^3 products chained x <- x @ b (b ~ N(0, 1/8192) keeps x's scale), random data."""
    x = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = (jax.random.normal(jax.random.key(2), (8192, 8192), jnp.float32) / 8192 ** 0.5).astype(jnp.bfloat16)

    @jax.jit
    def run(x, b):
        for _ in range(8):
            x = x @ b
        return x

    jax.block_until_ready(run(x, b))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            y = run(x, b)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - start) / 32)
    return 2 * 8192 ** 3 / float(np.median(times))


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """What a forward pass costs at least (BENCHMARKS.md's rooflines), from the params as the engine holds them."""

    read_bytes: int  # weight bytes a decode step reads: all but an untied embedding table (it only gathers rows)
    layer_params: int  # multiply-adds per token through the layers (the embedding is a gather, not a product)
    head_params: int  # multiply-adds per sampled row through the vocabulary projection
    kv_bytes_per_token: int  # K and V of one token over all layers, bf16 cache
    attention_width: int  # q-heads x head_dim x layers

    def attention_flops(self, tokens: int) -> float:
        """Causal self-attention of a `tokens`-long prompt: QK^T and PV over half the T x T scores."""
        return 2 * tokens * tokens * self.attention_width

    def prefill_flops(self, tokens: int, sampled_rows: int = 1) -> float:
        """One prompt's prefill: the layers for every token, attention, the projection of the sampled rows."""
        return 2 * self.layer_params * tokens + self.attention_flops(tokens) + 2 * self.head_params * sampled_rows


def model_costs(params: dict, config) -> ModelCosts:
    """`params`: {state path: array} (ModelRunner.params). Llama-3.1-8B: 15.01 GB read per decode step, 6.98 G
    layer params, 0.53 G in the vocabulary projection."""
    leaves = jax.tree_util.tree_leaves(params)
    embed = params["embed.weight"]
    head = params.get("lm_head.weight", embed)  # tied: the table is the projection
    untied_embed = head is not embed
    return ModelCosts(
        read_bytes=sum(x.nbytes for x in leaves) - (embed.nbytes if untied_embed else 0),
        layer_params=sum(x.size for x in leaves) - embed.size - (head.size if untied_embed else 0),
        head_params=head.size,
        kv_bytes_per_token=kv_sizing.bytes_per_block(  # bf16, every kv-head once (BENCHMARKS.md)
            num_layers=config.num_layers, kv_heads_per_device=config.num_kv_heads, head_dim=config.head_dim,
            block_size=1, itemsize=2),
        attention_width=config.num_q_heads * config.head_dim * config.num_layers)


def device_name() -> str:
    return jax.devices()[0].device_kind
