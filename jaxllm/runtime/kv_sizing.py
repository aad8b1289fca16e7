"""How many KV blocks fit: measured device memory on GPU, a configured byte budget on CPU."""

import dataclasses
import logging
import math

import jax

from jaxllm.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from jaxllm.models.quant_linear import quantized_paths

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KVPlan:
    num_blocks: int  # including the reserved null block
    block_size: int
    max_model_len: int
    bytes_per_block: int  # on one device

    @property
    def num_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def describe(self) -> str:
        concurrency = self.num_tokens / self.max_model_len
        return (f"KV cache: {self.num_blocks - 1} blocks = {self.num_tokens} tokens, "
                f"max concurrency at max_model_len {self.max_model_len}: {concurrency:.2f}x")


def bytes_per_block(*, num_layers: int, kv_heads_per_device: int, head_dim: int, block_size: int, itemsize: int) -> int:
    return 2 * num_layers * kv_heads_per_device * block_size * head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class ResidentMark:
    """A device's memory in use, and its live arrays' bytes, before the engine made anything: the engine's resident
    bytes later are the first plus what the second grew by.

    Not the allocator's "in use" after loading: that also counts dropped buffers whose release waits for the GPU,
    a number that varies from start to start, and with it every step program's shape and the compile cache's hits
    (docs/perf-notes.md#kv-cache-sizing-the-largest-free-block-and-resident-bytes). The largest free block
    (kv_budget_bytes) still depends on that timing; it decides only when memory is split."""

    in_use: int
    array_bytes: int

    @classmethod
    def take(cls, device: jax.Device) -> "ResidentMark | None":
        """None where the device reports no allocator statistics (CPU)."""
        stats = _allocator_stats(device)
        return cls(stats["bytes_in_use"], device_array_bytes(device)) if stats else None

    def resident_bytes(self, device: jax.Device) -> int:
        return self.in_use + device_array_bytes(device) - self.array_bytes


def _allocator_stats(device: jax.Device) -> dict | None:
    return device.memory_stats() if device.platform != "cpu" else None


def device_array_bytes(device: jax.Device) -> int:
    """Bytes of every live jax.Array's shard on `device`."""
    return sum(math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize
               for array in jax.live_arrays() if device in array.sharding.device_set)


def kv_budget_bytes(config: EngineConfig, device: jax.Device, *, activation_bytes: int,
                    resident: ResidentMark | None) -> int:
    """Bytes left for the KV cache on one device once the engine's resident bytes (the weights, `resident`) and the
    largest step's activations are accounted for.

    Free memory need not be usable: holes between the weights can be smaller than one layer's share of the cache
    (docs/perf-notes.md#kv-cache-sizing-the-largest-free-block-and-resident-bytes). So the cache, and after it the
    step's temporaries (one contiguous buffer), are sized to come out of the largest free block."""
    if config.kv_cache_memory_bytes is not None:
        return config.kv_cache_memory_bytes
    stats = _allocator_stats(device)
    if not stats or resident is None:
        return DEFAULT_CPU_KV_CACHE_BYTES
    limit = stats["bytes_limit"]
    in_use = resident.resident_bytes(device)
    budget = int(limit * config.gpu_memory_utilization) - in_use - activation_bytes
    largest = stats.get("largest_free_block_bytes")
    if largest is not None and largest - activation_bytes < budget:
        logger.info("device memory: %.2f GiB free but its largest block is %.2f GiB: the KV cache fits in that",
                    (limit - in_use) / 2**30, largest / 2**30)
        budget = largest - activation_bytes
    logger.info("device memory: limit %.2f GiB, weights %.2f GiB, activations %.2f GiB -> KV %.2f GiB",
                limit / 2**30, in_use / 2**30, activation_bytes / 2**30, budget / 2**30)
    return budget


def plan_kv_cache(config: EngineConfig, *, budget_bytes: int, block_bytes: int, model_max_len: int) -> KVPlan:
    """Decide the number of blocks and the max_model_len they can serve.

    A max_model_len the user asked for that cannot fit is an error with the numbers and both ways out; one taken
    from the model's config is clamped to what fits, with a warning (a documented choice: the default model must
    start on any machine)."""
    num_blocks = budget_bytes // block_bytes
    capacity = (num_blocks - 1) * config.block_size
    if num_blocks < 2:
        raise ValueError(f"no memory left for the KV cache ({budget_bytes / 2**30:.2f} GiB available, one block "
                         f"needs {block_bytes / 2**20:.2f} MiB): increase gpu_memory_utilization or "
                         f"kv_cache_memory_bytes, or use a smaller model")
    max_model_len = config.max_model_len or model_max_len
    if config.max_model_len and config.max_model_len > model_max_len:
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                       config.max_model_len, model_max_len)
    if max_model_len > capacity:
        if config.max_model_len is not None:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the maximum number of tokens that can be stored "
                f"in the KV cache ({capacity}). Try increasing gpu_memory_utilization (or kv_cache_memory_bytes) "
                f"or decreasing max_model_len.")
        logger.warning("max_model_len clamped from the model's %d to %d tokens: the KV cache holds no more",
                       max_model_len, capacity)
        max_model_len = capacity
    max_model_len = max(config.block_size, max_model_len)
    return KVPlan(num_blocks=num_blocks, block_size=config.block_size, max_model_len=max_model_len,
                  bytes_per_block=block_bytes)


def num_cpu_blocks(config: EngineConfig, bytes_per_block: int) -> int:
    """The CPU pool for swapped-out blocks: swap_space GiB, or none across hosts (a host holds only its shards of a
    block, so preemption recomputes instead, as vLLM V1 always does)."""
    if config.nnodes > 1:
        return 0
    return int(config.swap_space * 2**30 // bytes_per_block)


def describe_memory(model, params: dict[str, jax.Array], plan: KVPlan, device: jax.Device) -> str:
    """One device's weights, the packed part of them when the model is quantized, and the KV cache they leave."""
    mine = {path: array for path, array in params.items() if device in array.sharding.device_set}
    weights = sum(map(_shard_bytes, mine.values()))
    kv = plan.num_blocks * plan.bytes_per_block
    packed = ""
    if model.quantization is not None:
        linears = quantized_paths(model)
        packed_bytes = sum(_shard_bytes(a) for path, a in mine.items() if path.rpartition(".")[0] in linears)
        packed = f" ({model.quantization}: {_size(packed_bytes)} of it packed linears)"
    return f"weights {_size(weights)} per device{packed}; KV cache {_size(kv)} per device"


def _shard_bytes(array: jax.Array) -> int:
    return math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.2f} MiB"


def max_blocks_per_seq(max_model_len: int, block_size: int) -> int:
    return math.ceil(max_model_len / block_size)
