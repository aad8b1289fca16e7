"""Pallas GPU kernels: paged attention, rotary + KV-cache write, the fused residual add + RMSNorm, the weight-only
int4 / int8 matmul (and the FP8-weight matmul XLA serves). Depends on jax only, never on jaxllm.

File names say what a file holds: `<op>.py` is the jitted public entry (it checks shapes and picks a backend),
`<op>_kernel.py` the Pallas kernel and the wrapper that builds its pallas_call, `<op>_reference.py` the pure-jnp
oracle of the tests, `<op>_xla.py` the plain-XLA serving path of the CPU; attention_tile.py holds the building
blocks the attention kernels share, positions.py each token's sequence and position, kv_write.py the XLA write of
new keys and values into the pages, quant_pack.py the packed int4 / int8 layout of the quantized matmul,
sharded.py the entries under tensor parallelism (shard_map over "tp").
"""

from pallas_kernels.backend import resolve_backend
from pallas_kernels.decode_attention_kernel import DecodeConfig
from pallas_kernels.fp8_matmul import fp8_matmul
from pallas_kernels.kv_write import write_kv
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.quant_matmul_kernel import QuantMatmulConfig
from pallas_kernels.ragged_attention_kernel import RaggedConfig
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention_reference import ragged_paged_attention_reference
from pallas_kernels.rotary_kv import rotary_write_kv
from pallas_kernels.sharded import quant_matmul_sharded, ragged_paged_attention_sharded, rotary_write_kv_sharded

__all__ = [
    "DecodeConfig",
    "QuantMatmulConfig",
    "RaggedConfig",
    "fp8_matmul",
    "quant_matmul",
    "quant_matmul_sharded",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_sharded",
    "resolve_backend",
    "rotary_write_kv",
    "rotary_write_kv_sharded",
    "write_kv",
]
