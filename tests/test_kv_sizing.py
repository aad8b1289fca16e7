"""The KV cache's byte budget on a GPU: gpu_memory_utilization of the limit, less the weights and the largest step's
activations, and never more than the largest free block can hold (free memory split into holes is not usable)."""

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm import EngineConfig
from jaxllm.runtime.kv_sizing import ResidentMark, device_array_bytes, kv_budget_bytes

GIB = 2 ** 30


@dataclasses.dataclass(eq=False)  # hashable by identity, as devices are: it is looked up in arrays' device sets
class Device:
    """What kv_budget_bytes reads of a jax.Device; a GPU's allocator statistics cannot be produced on CPU."""

    stats: dict
    platform: str = "gpu"

    def memory_stats(self) -> dict:
        return self.stats


def resident(in_use: int) -> ResidentMark:
    """The engine's resident bytes: `in_use` (no arrays of this fake device are alive, so they add nothing)."""
    return ResidentMark(in_use=in_use, array_bytes=0)


def test_budget_is_the_utilization_share_less_weights_and_activations():
    elsewhere = jax.device_put(jnp.ones(1000), jax.devices()[0])  # an array on another device adds nothing here
    device = Device({"bytes_limit": 100 * GIB, "bytes_in_use": 16 * GIB, "largest_free_block_bytes": 84 * GIB})
    config = EngineConfig(gpu_memory_utilization=0.9)
    assert kv_budget_bytes(config, device, activation_bytes=3 * GIB, resident=resident(16 * GIB)) == 71 * GIB
    # Buffers dropped but not yet released by the allocator (2 GiB more "in use") change nothing.
    device.stats["bytes_in_use"] = 18 * GIB
    assert kv_budget_bytes(config, device, activation_bytes=3 * GIB, resident=resident(16 * GIB)) == 71 * GIB
    assert elsewhere.size == 1000


def test_budget_fits_the_largest_free_block_with_room_for_the_activations():
    # 70B at tp 4 after fusion: 77 GiB free, but 18 GiB of it in holes between the weights.
    device = Device({"bytes_limit": 112 * GIB, "bytes_in_use": 35 * GIB, "largest_free_block_bytes": 59 * GIB})
    config = EngineConfig(gpu_memory_utilization=0.9)
    assert kv_budget_bytes(config, device, activation_bytes=4 * GIB, resident=resident(35 * GIB)) == 55 * GIB
    # Statistics without the field (another allocator): the total decides.
    device.stats.pop("largest_free_block_bytes")
    assert (kv_budget_bytes(config, device, activation_bytes=4 * GIB, resident=resident(35 * GIB))
            == int(112 * GIB * 0.9) - 39 * GIB)


def test_an_explicit_kv_cache_size_wins():
    device = Device({"bytes_limit": 100 * GIB, "bytes_in_use": 16 * GIB, "largest_free_block_bytes": 1 * GIB})
    config = EngineConfig(kv_cache_memory_bytes=5 * GIB)
    assert kv_budget_bytes(config, device, activation_bytes=GIB, resident=resident(16 * GIB)) == 5 * GIB


def test_resident_bytes_follow_the_live_arrays_on_the_device():
    """What the engine holds is what it made since the mark: arrays made after it count, dropped ones stop counting
    at once (the allocator may release their memory later)."""
    device = jax.devices()[0]
    before = device_array_bytes(device)
    mark = ResidentMark(in_use=5 * GIB, array_bytes=before)
    weights = jax.device_put(jnp.arange(3 * 1024, dtype=jnp.float32).reshape(3, 1024), device)
    bf16 = jax.device_put(jnp.ones((7, 9), jnp.bfloat16), device)
    assert mark.resident_bytes(device) == 5 * GIB + 3 * 1024 * 4 + 7 * 9 * 2
    del weights
    assert mark.resident_bytes(device) == 5 * GIB + 7 * 9 * 2
    del bf16
    assert mark.resident_bytes(device) == 5 * GIB
