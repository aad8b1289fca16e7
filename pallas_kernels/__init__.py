"""Pallas GPU kernels: paged attention, rotary + KV-cache write, the fused residual add + RMSNorm. Depends on jax
only, never on jaxllm."""

from pallas_kernels.backend import resolve_backend
from pallas_kernels.decode_attention import DecodeConfig
from pallas_kernels.ragged_attention_kernel import RaggedConfig
from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
)
from pallas_kernels.rotary_kv import rotary_write_kv
from pallas_kernels.sharded import ragged_paged_attention_sharded, rotary_write_kv_sharded

__all__ = [
    "DecodeConfig",
    "RaggedConfig",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_sharded",
    "resolve_backend",
    "rotary_write_kv",
    "rotary_write_kv_sharded",
    "write_kv",
]
