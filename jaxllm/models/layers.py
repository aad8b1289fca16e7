"""Stateless layer functions shared by the decoder modules (models/modules.py, attention.py, decoder_layer.py).

Legend: T tokens, D hidden size, F MLP intermediate size, N q-heads, K kv-heads, H head_dim (R = H // 2 rotary
frequencies), V vocabulary.

Numerics follow Hugging Face so fp32 logits match to ~1e-6 and bf16 rounds where HF rounds: RMSNorm and the rotary
angles are computed in float32, everything else in the params dtype.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxllm import sharding
from jaxllm.model_config import ModelConfig
from pallas_kernels import add_rms_norm_kernel as fused_norm
from pallas_kernels.backend import TRITON, resolve_backend


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., D], weight [D]. HF casts back to the input dtype *before* the weight multiply; so do we."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def add_rms_norm(x: jax.Array, h: jax.Array, weight: jax.Array, eps: float, *, backend: str = "auto",
                 mesh: Mesh | None = None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The residual stream's step: (x + h, rms_norm(x + h)); x, h [T, D]. On the Triton backend one kernel
    (pallas_kernels.add_rms_norm_kernel) instead of XLA's three, under tensor parallelism on each device's replicated
    copy; elsewhere, and for hidden sizes the kernel does not take, the expression itself."""
    if resolve_backend(backend) != TRITON or not fused_norm.supports(x.shape[-1]):
        total = x + h
        return total, rms_norm(total, weight, eps)
    kernel = functools.partial(fused_norm.add_rms_norm_triton, eps=eps, interpret=interpret)
    if sharding.tp_size(mesh) == 1:
        return kernel(x, h, weight)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)(x, h, weight)  # a pallas_call carries no varying-axis annotation


def rope_inv_freq(config: ModelConfig) -> np.ndarray:  # f32[R]
    """Rotary inverse frequencies, with HF's linear / llama3 (Llama 3.1) scaling. Host constants: no params."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate the band between (Llama 3.1 paper §3).
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """positions i32[T] -> cos, sin [T, R] in `dtype`: angles in float32, then rounded like HF's `cos.to(x.dtype)`."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, R]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def embed(table: jax.Array, token_ids: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """table [V, D] rows at token_ids [T] -> [T, D].

    A table split over the vocabulary ("tp") is looked up as vLLM's VocabParallelEmbedding does: each device takes
    the ids inside its slice of rows (zeros for the others) and one all-reduce of [T, D] sums the parts. Left to the
    partitioner, XLA:GPU all-gathered the whole table every step of few tokens
    (docs/perf-notes.md#vocab-parallel-embedding).
    """
    if sharding.tp_size(mesh) == 1 or sharding.TP not in sharding.param_spec("embed.weight", table.shape, mesh):
        return jnp.take(table, token_ids, axis=0)

    def lookup(rows, ids):  # rows [V / tp, D]: this device's slice
        local = ids - jax.lax.axis_index(sharding.TP) * rows.shape[0]
        inside = (local >= 0) & (local < rows.shape[0])
        x = jnp.take(rows, jnp.where(inside, local, 0), axis=0)
        return jax.lax.psum(jnp.where(inside[:, None], x, 0), sharding.TP)

    return jax.shard_map(lookup, mesh=mesh, in_specs=(P(sharding.TP, None), P()), out_specs=P())(table, token_ids)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [T, I] @ weight [I, O] (+ bias [O]) -> [T, O]."""
    y = jnp.einsum("TI,IO->TO", x, weight)
    return y if bias is None else y + bias


def fused_linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [T, I] @ weight [I, S, W] (+ bias [S, W]) -> [T, S, W]: one matmul over every shard's columns."""
    y = jnp.einsum("TI,ISW->TSW", x, weight)
    return y if bias is None else y + bias
