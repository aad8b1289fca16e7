"""The KV cache's byte budget on a GPU: gpu_memory_utilization of the limit, less the weights and the largest step's
activations, and never more than the largest free block can hold (free memory split into holes is not usable)."""

import dataclasses

from jaxllm import EngineConfig
from jaxllm.runtime.kv_sizing import kv_budget_bytes

GIB = 2 ** 30


@dataclasses.dataclass
class Device:
    """What kv_budget_bytes reads of a jax.Device; a GPU's allocator statistics cannot be produced on CPU."""

    stats: dict
    platform: str = "gpu"

    def memory_stats(self) -> dict:
        return self.stats


def test_budget_is_the_utilization_share_less_weights_and_activations():
    device = Device({"bytes_limit": 100 * GIB, "bytes_in_use": 16 * GIB, "largest_free_block_bytes": 84 * GIB})
    assert kv_budget_bytes(EngineConfig(gpu_memory_utilization=0.9), device, activation_bytes=3 * GIB) == 71 * GIB


def test_budget_fits_the_largest_free_block_with_room_for_the_activations():
    # 70B at tp 4 after fusion: 77 GiB free, but 18 GiB of it in holes between the weights.
    device = Device({"bytes_limit": 112 * GIB, "bytes_in_use": 35 * GIB, "largest_free_block_bytes": 59 * GIB})
    config = EngineConfig(gpu_memory_utilization=0.9)
    assert kv_budget_bytes(config, device, activation_bytes=4 * GIB) == 55 * GIB
    # Statistics without the field (another allocator): the total decides.
    device.stats.pop("largest_free_block_bytes")
    assert kv_budget_bytes(config, device, activation_bytes=4 * GIB) == int(112 * GIB * 0.9) - 39 * GIB


def test_an_explicit_kv_cache_size_wins():
    device = Device({"bytes_limit": 100 * GIB, "bytes_in_use": 16 * GIB, "largest_free_block_bytes": 1 * GIB})
    config = EngineConfig(kv_cache_memory_bytes=5 * GIB)
    assert kv_budget_bytes(config, device, activation_bytes=GIB) == 5 * GIB
