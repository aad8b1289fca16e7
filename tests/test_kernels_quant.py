"""The quantized matmuls: the int4 / int8 Pallas kernel in the CPU interpreter against the jnp reference, the packed
layout, the entry's shape errors, the FP8-weight matmul against its reference, the benchmark's smoke run, and the
tensor-parallel entry on 4 CPU devices (a child process, as tests/test_kernels_sharded.py).

The kernel cases cover each axis (M, ragged K and N, group size, bits, symmetric / asymmetric zeros, x and scale
dtypes, launch shape and split-K) without their full product: the interpreter traces every case anew. The
interpreter starts every output as NaN, so an output element the kernel forgets to write fails the comparison.
"""

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_matmul import fp8_matmul
from pallas_kernels.fp8_matmul_reference import fp8_matmul_reference, quantize_rows
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.quant_matmul_kernel import QuantMatmulConfig
from pallas_kernels.quant_pack import pack_int, unpack_int


def _quantized(k: int, n: int, group: int | None, bits: int, *, symmetric: bool, scale_dtype, seed: int):
    """Random values [K, N], their packed words and group scales / zeros (fractional zeros when asymmetric, as
    GGUF's affine blocks give)."""
    rng = np.random.default_rng(seed)
    groups = k // (group or k)
    values = rng.integers(0, 2**bits, (k, n))
    scales = rng.uniform(0.5, 1.5, (groups, n)) / 2**bits
    if symmetric:
        zeros = np.full((groups, n), 2.0 ** (bits - 1))
    else:
        zeros = rng.integers(0, 2**bits, (groups, n)) + rng.choice([0.0, 0.25], (groups, n))
    return (values, jnp.asarray(pack_int(values, bits)), jnp.asarray(scales, scale_dtype),
            jnp.asarray(zeros, scale_dtype))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    e = 32 // bits
    values = rng.integers(0, 2**bits, (e * 7, 13))
    packed = pack_int(values, bits)
    assert packed.shape == (7, 13) and packed.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(unpack_int(packed, bits)), values)
    # GPTQ's order: row r * E + j of a column sits in bits [j * bits, (j + 1) * bits) of word r.
    word = int(packed[2, 5]) & 0xFFFFFFFF
    assert [(word >> (j * bits)) & (2**bits - 1) for j in range(e)] == list(values[2 * e:3 * e, 5])
    with pytest.raises(ValueError, match="do not pack"):
        pack_int(values[:e + 1], bits)
    with pytest.raises(ValueError, match="do not fit"):
        pack_int(np.full((e, 2), 2**bits), bits)


SMALL = QuantMatmulConfig(block_m=16, block_n=32, block_words=16)
KERNEL_CASES = [
    # M, K, N, group (None: per-channel), bits, symmetric, x dtype, scale dtype, config (None: for_rows(M))
    (1, 512, 200, 128, 4, False, jnp.bfloat16, jnp.float16, None),  # decode shape, N past the tile
    (3, 200, 72, None, 4, True, jnp.float32, jnp.float32, None),  # per-channel, K a part tile of 32 words
    (16, 256, 96, 32, 4, False, jnp.bfloat16, jnp.float32, QuantMatmulConfig(block_n=32, num_splits=3)),
    (64, 192, 130, 64, 8, True, jnp.float32, jnp.float16, QuantMatmulConfig(block_m=32, block_n=64)),
    (200, 384, 80, 128, 8, False, jnp.bfloat16, jnp.float16, None),  # larger-M shape, M past the 64-row tile
    (1, 96, 48, 32, 8, False, jnp.float32, jnp.float32, QuantMatmulConfig(block_words=16, num_splits=2)),
    (64, 320, 64, None, 8, False, jnp.bfloat16, jnp.float32, None),  # per-channel int8, K a part tile
    (70, 320, 64, None, 4, False, jnp.float32, jnp.float32, None),  # larger-M shape, ragged K, deinterleaved x
    (3, 448, 40, 64, 4, True, jnp.bfloat16, jnp.float16, SMALL),  # group 64 = 8 words: gathered group rows
    (16, 1024, 32, 128, 4, False, jnp.float32, jnp.float16, QuantMatmulConfig(target_programs=4,
                                                                               min_split_tiles=1)),  # auto split
]


@pytest.mark.parametrize("m,k,n,group,bits,symmetric,x_dtype,scale_dtype,config", KERNEL_CASES)
def test_kernel_matches_reference(m, k, n, group, bits, symmetric, x_dtype, scale_dtype, config):
    values, qweight, scales, zeros = _quantized(k, n, group, bits, symmetric=symmetric, scale_dtype=scale_dtype,
                                                seed=m + k + n)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), x_dtype)
    ref = quant_matmul(x, qweight, scales, zeros, bits=bits, backend="reference")
    out = quant_matmul(x, qweight, scales, zeros, bits=bits, backend="triton", config=config, interpret=True)
    assert out.shape == (m, n) and out.dtype == x_dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "an output element is NaN: unwritten or poisoned"
    # The reference itself against a numpy dequantization, so the kernel cannot share a bug with it.
    g = k // scales.shape[0]
    w = (values - np.repeat(np.asarray(zeros, np.float64), g, 0)) * np.repeat(np.asarray(scales, np.float64), g, 0)
    want = np.asarray(x, np.float64) @ w
    bf16 = x_dtype == jnp.bfloat16  # the kernel rounds each dequantized weight to bf16 for the tensor cores
    tol = (2e-2 if bf16 else 1e-5) * np.abs(want).max()
    np.testing.assert_allclose(ref, want, atol=tol / 2 if bf16 else tol, rtol=0)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("m,bits", [(1, 4), (70, 8)])
def test_act_order_rows_sorted_by_group_give_the_g_idx_product(m, bits):
    """GPTQ's desc_act: row k of the checkpoint belongs to group g_idx[k], in no order. The loaders sort the rows by
    group once (perm) and the model multiplies x[:, perm]: the kernel over that must equal x @ the g_idx weight."""
    k, n, group = 256, 48, 32
    rng = np.random.default_rng(m)
    g_idx = rng.permutation(np.arange(k) // group)  # every group its 32 rows, scattered over K
    values = rng.integers(0, 2**bits, (k, n))
    scales = rng.uniform(0.5, 1.5, (k // group, n)) / 2**bits
    zeros = rng.integers(0, 2**bits, (k // group, n)).astype(np.float64)
    w = (values - zeros[g_idx]) * scales[g_idx]  # [K, N], each row with its own group's scale and zero
    x = rng.standard_normal((m, k))
    perm = np.argsort(g_idx, kind="stable")
    out = quant_matmul(jnp.asarray(x[:, perm], jnp.float32), jnp.asarray(pack_int(values[perm], bits)),
                       jnp.asarray(scales, jnp.float32), jnp.asarray(zeros, jnp.float32), bits=bits,
                       backend="triton", interpret=True)
    want = x @ w
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_entry_on_cpu_serves_the_reference():
    _, qweight, scales, zeros = _quantized(64, 24, 32, 4, symmetric=False, scale_dtype=jnp.float16, seed=0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 64)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(quant_matmul(x, qweight, scales, zeros, bits=4)),
                                  np.asarray(quant_matmul(x, qweight, scales, zeros, bits=4, backend="reference")))


def test_entry_shape_errors():
    _, qweight, scales, zeros = _quantized(64, 24, 32, 4, symmetric=True, scale_dtype=jnp.float32, seed=1)
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match="holds 64 inputs, x has 72"):
        quant_matmul(jnp.ones((2, 72)), qweight, scales, zeros, bits=4)
    with pytest.raises(ValueError, match="holds 32 inputs"):
        quant_matmul(x, qweight, scales, zeros, bits=8)  # int8 words hold 4 values: 8 packed rows are 32 inputs
    with pytest.raises(ValueError, match="bits must be one of"):
        quant_matmul(x, qweight, scales, zeros, bits=3)
    with pytest.raises(ValueError, match="are not"):
        quant_matmul(x, qweight, scales, zeros[:, :-1], bits=4)
    with pytest.raises(ValueError, match="are not"):
        quant_matmul(x, qweight, jnp.ones((3, 24)), jnp.ones((3, 24)), bits=4)  # 3 groups do not divide 64
    with pytest.raises(ValueError, match="whole words"):
        quant_matmul(x, qweight, jnp.ones((16, 24)), jnp.ones((16, 24)), bits=4)  # groups of 4 rows
    with pytest.raises(ValueError, match="expected x"):
        quant_matmul(jnp.ones((64,)), qweight, scales, zeros, bits=4)


def test_config_checks_and_step():
    with pytest.raises(ValueError, match="block_words"):
        QuantMatmulConfig(block_words=24)
    with pytest.raises(ValueError, match="num_splits"):
        QuantMatmulConfig(num_splits=0)
    config = QuantMatmulConfig(block_words=64)
    assert config.step_words(group_words=16, num_groups=4) == (16, True)  # int4 group 128: a step per group
    assert config.step_words(group_words=4, num_groups=8) == (16, False)  # int4 group 32: 4 groups per step
    assert config.step_words(group_words=25, num_groups=1) == (64, True)  # per-channel
    assert QuantMatmulConfig.for_rows(1).block_m == 16 and QuantMatmulConfig.for_rows(40).block_m == 64
    assert QuantMatmulConfig.for_rows(65).deinterleave_x and QuantMatmulConfig.for_rows(1024).block_m == 128
    assert QuantMatmulConfig.for_rows(1024, itemsize=4).block_m == 64  # f32 x: three stages must fit shared memory


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_matmul_matches_reference(dynamic, x_dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 96)) * np.array([[1.0], [1e3], [1e-3], [0.0], [5.0], [1.0], [2.0]])
    x = jnp.asarray(x, x_dtype)
    weight = jnp.asarray(rng.standard_normal((96, 40)), jnp.float8_e4m3fn)
    scales = jnp.asarray(rng.uniform(0.01, 0.02, (1, 40)), jnp.float32)
    ref = fp8_matmul_reference(x, weight, scales, dynamic_activations=dynamic)
    exact = np.asarray(x, np.float64) @ (np.asarray(weight.astype(jnp.float32), np.float64) * np.asarray(scales))
    scale = np.abs(exact).max(axis=1, keepdims=True) + 1e-30  # rows differ by 1e6 in magnitude: compare per row
    # Per-token e4m3 activations carry 3 mantissa bits: a few % of each row's magnitude, whatever its scale.
    tol = 0.1 if dynamic else (1e-2 if x_dtype == jnp.bfloat16 else 1e-6)
    assert np.abs((np.asarray(ref, np.float64) - exact) / scale).max() < tol
    if dynamic:
        assert np.abs((np.asarray(ref, np.float64) - exact) / scale).max() > 1e-4, "x was not rounded to e4m3"
    for backend in ("xla", "triton"):  # "triton" takes the FP8 dot branch (XLA:CPU has one too)
        out = fp8_matmul(x, weight, scales, dynamic_activations=dynamic, backend=backend)
        assert out.dtype == x_dtype and out.shape == (7, 40)
        err = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64)) / scale
        assert err.max() < (1e-2 if x_dtype == jnp.bfloat16 else 1e-5), backend
    assert (np.asarray(ref)[3] == 0).all(), "an all-zero row must stay zero"


def test_quantize_rows_uses_each_rows_range():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 50)) * np.array([[1.0], [300.0], [1e-4]]))
    xq, scale = quantize_rows(x)
    assert xq.dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(np.asarray(scale)[:, 0], np.abs(np.asarray(x)).max(axis=1) / 448, rtol=1e-6)
    np.testing.assert_array_equal(np.abs(np.asarray(xq.astype(jnp.float32))).max(axis=1), [448.0] * 3)


def test_fp8_matmul_shape_errors():
    w = jnp.ones((16, 8), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="expected x"):
        fp8_matmul(jnp.ones((2, 15)), w, jnp.ones((1, 8)), dynamic_activations=False)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_matmul(jnp.ones((2, 16)), jnp.ones((16, 8)), jnp.ones((1, 8)), dynamic_activations=False)
    with pytest.raises(ValueError, match="scales"):
        fp8_matmul(jnp.ones((2, 16)), w, jnp.ones((8,)), dynamic_activations=True)


def test_benchmark_smoke(tmp_path):
    from benchmarks import quant_kernel

    out = tmp_path / "quant.json"
    report = quant_kernel.main(["--smoke", "--output-json", str(out)])
    assert out.exists() and report["smoke"] and report["copy_bandwidth_gbs"] is None
    assert {r["variant"] for r in report["results"]} == {"int4_g128", "int8_channel"}
    assert all(r["us"] > 0 and r["packed_bytes"] > 0 for r in report["results"])


SHARDED_CHILD = r"""
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from pallas_kernels.quant_pack import pack_int
from pallas_kernels.quant_matmul import quant_matmul
from pallas_kernels.sharded import quant_matmul_sharded

assert jax.device_count() == 4
rng = np.random.default_rng(0)

def case(k, n, group, bits):
    groups = k // group
    qweight = jnp.asarray(pack_int(rng.integers(0, 2**bits, (k, n)), bits))
    scales = jnp.asarray(rng.uniform(0.01, 0.02, (groups, n)), jnp.float32)
    zeros = jnp.asarray(rng.integers(0, 2**bits, (groups, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    return x, qweight, scales, zeros

for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4,), ("tp",), axis_types=(axis_type,))
    put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
    # The interpreted kernel under one kind of mesh axes (it is slow to trace); the reference under both.
    backends = (("reference", False), ("triton", True)) if axis_type == AxisType.Explicit else (("reference", False),)
    with jax.set_mesh(mesh):
        for k, n, group, bits in [(256, 64, 32, 4), (128, 32, 128, 8)]:  # grouped int4; per-channel int8
            x, qweight, scales, zeros = case(k, n, group, bits)
            ref = np.asarray(quant_matmul(x, qweight, scales, zeros, bits=bits, backend="reference"))
            one_group = scales.shape[0] == 1
            layouts = {"column": ((), (None, "tp"), (None, "tp")),
                       "row": ((None, "tp"), ("tp", None), () if one_group else ("tp", None))}
            for parallel, (xs, ws, ss) in layouts.items():
                args = (put(x, *xs), put(qweight, *ws), put(scales, *ss), put(zeros, *ss))
                for backend, interpret in backends:
                    out = jax.jit(functools.partial(quant_matmul_sharded, bits=bits, mesh=mesh, parallel=parallel,
                                                    backend=backend, interpret=interpret))(*args)
                    column_split = parallel == "column" and out.sharding.spec == P(None, "tp")
                    assert column_split or (parallel == "row" and out.sharding.is_fully_replicated), out.sharding
                    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
with jax.set_mesh(mesh):
    def refused(message, *args, **knobs):
        try:
            quant_matmul_sharded(*args, bits=4, mesh=mesh, **knobs)
        except ValueError as e:
            assert message in str(e), e
        else:
            raise AssertionError(f"{knobs} must be refused")

    three_groups = case(192, 20, 64, 4)  # 3 groups of 64 rows cannot split over 4 devices
    refused("qweight (24, 20) (scales (3, 20): 3 groups) does not split", *three_groups, parallel="row")
    refused("'column' or 'row'", *three_groups, parallel="diagonal")
    refused("18 output columns of qweight (8, 18)", *case(64, 18, 32, 4), parallel="column")
print("QUANT SHARDED OK")
"""


@pytest.mark.server
def test_sharded_quant_matmul_matches_unsharded():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", SHARDED_CHILD], env=env, cwd=root, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0 and "QUANT SHARDED OK" in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]

