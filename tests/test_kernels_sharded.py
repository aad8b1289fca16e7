"""The tensor-parallel wrappers (attention, rotary + KV writes, the fused add + RMSNorm) on 4 CPU devices, in a child
process: the device count must be set before jax is imported, and the rest of the suite has already imported it
with one device."""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server

CHILD = r"""
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from ragged_batch import make_ragged_batch
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.rotary_kv import rotary_write_kv
from pallas_kernels.sharded import ragged_paged_attention_sharded, rotary_write_kv_sharded

assert jax.device_count() == 4
batch = make_ragged_batch([3, 17, 1], [20, 40, 7], num_q_heads=16, num_kv_heads=4, head_dim=64, page_size=16,
                          pad_tokens=2, pad_seqs=1)
ref = np.asarray(ragged_paged_attention(*batch.args, scale=0.125, sliding_window=16, backend="reference"))
# One fused q/k/v block per device (its 4 q-heads, its kv-head's k and v), as fuse_params lays them out.
qkv = jax.random.normal(jax.random.key(1), (3, 4, 6 * 64))
cos, sin = jnp.cos(jnp.arange(96.0).reshape(3, 32)), jnp.sin(jnp.arange(96.0).reshape(3, 32))
slots = jnp.array([5, 17, 40], jnp.int32)
heads = qkv.reshape(3, 4, 6, 64)
unfused = jnp.concatenate([heads[:, :, :4].reshape(3, 16 * 64), heads[:, :, 4].reshape(3, 4 * 64),
                           heads[:, :, 5].reshape(3, 4 * 64)], axis=1)  # all q heads, all k heads, all v heads
q_ref, k_ref, v_ref = rotary_write_kv(unfused, cos, sin, batch.k_pages, batch.v_pages, slots, num_q_heads=16)
for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4,), ("tp",), axis_types=(axis_type,))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    args = (put(batch.q, None, "tp", None), put(batch.k_pages, "tp"), put(batch.v_pages, "tp"),
            put(batch.block_tables), put(batch.seq_lens), put(batch.query_start_loc))
    with jax.set_mesh(mesh):
        # The interpreted kernel once (it is slow to trace); the reference under both kinds of mesh axes.
        backends = (("reference", False), ("triton", True)) if axis_type == AxisType.Explicit else (
            ("reference", False),)
        for backend, interpret in backends:
            attend = jax.jit(functools.partial(ragged_paged_attention_sharded, mesh=mesh, scale=0.125,
                                               sliding_window=16, backend=backend, interpret=interpret))
            out = attend(*args)
            assert out.sharding.spec == P(None, "tp", None), out.sharding
            np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
        for backend, interpret in backends:
            q, k, v = jax.jit(functools.partial(rotary_write_kv_sharded, num_q_heads=16, mesh=mesh, backend=backend,
                                                interpret=interpret))(
                put(qkv, None, "tp", None), put(cos), put(sin), args[1], args[2], put(slots))
            assert q.sharding.spec == P(None, "tp", None) and k.sharding.spec[0] == "tp", (q.sharding, k.sharding)
            np.testing.assert_allclose(np.asarray(q), np.asarray(q_ref), atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(k), np.asarray(k_ref), atol=1e-6, rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(v), np.asarray(v_ref))
# The fused residual add + RMSNorm runs on each device's replicated copy of the stream.
from jaxllm.models.layers import add_rms_norm
mesh = jax.make_mesh((4,), ("tp",), axis_types=(AxisType.Auto,))
x, h, w = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate([(5, 64), (5, 64), (64,)]))
with jax.set_mesh(mesh):
    total, normed = jax.jit(functools.partial(add_rms_norm, eps=1e-6, backend="triton", mesh=mesh, interpret=True))(
        *(jax.device_put(a, NamedSharding(mesh, P())) for a in (x, h, w)))
want_total, want = add_rms_norm(x, h, w, 1e-6, backend="reference")
np.testing.assert_array_equal(np.asarray(total), np.asarray(want_total))
np.testing.assert_allclose(np.asarray(normed), np.asarray(want), atol=1e-6, rtol=1e-6)
mesh3 = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
batch3 = make_ragged_batch([1], [5], num_q_heads=3, num_kv_heads=3, head_dim=64, page_size=16)
try:
    ragged_paged_attention_sharded(*batch3.args, mesh=mesh3, scale=1.0)
    raise AssertionError("3 kv heads over 2 devices must be refused")
except ValueError as e:
    assert "multiple of the 'tp' axis size" in str(e), e
print("SHARDED OK")
"""


def test_sharded_attention_and_write_match_unsharded():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0 and "SHARDED OK" in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]
