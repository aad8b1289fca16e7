"""Pallas GPU kernels for paged attention. Depends on jax only, never on jaxllm."""

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
)

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "write_kv"]
