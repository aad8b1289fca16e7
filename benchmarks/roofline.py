"""The card's ceilings, measured in the same run as the figures they judge: copy bandwidth and bf16 matmul rate."""

import time

import jax
import jax.numpy as jnp


def _time(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(num_bytes: int = 4 * 2**30) -> float:
    """Bytes/s of `a * 2` over a bf16 array, counting the read and the write."""
    x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
    seconds = _time(jax.jit(lambda a: a * 2), x)
    return 2 * x.nbytes / seconds


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matmul on random data."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    seconds = _time(jax.jit(lambda x, y: x @ y), a, b)
    return 2 * n ** 3 / seconds


def device_name() -> str:
    return jax.devices()[0].device_kind
