"""The Pallas kernels (attention; rotary + KV write; the fused residual add + RMSNorm) in the CPU interpreter against
the jnp reference, and the entry's contract.

The interpreter starts every output as NaN (test_interpreter_poisons_outputs checks that), so an element a kernel
forgets to write fails the comparison. Sizes are small and tile sizes smaller than the defaults, so multi-tile
loops, partial tiles and several programs per sequence are exercised within CI time.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxllm.models.layers import add_rms_norm, rms_norm
from pallas_kernels import add_rms_norm_kernel as fused_norm
from pallas_kernels import attention_tile, backend
from pallas_kernels.add_rms_norm_kernel import add_rms_norm_triton
from pallas_kernels.backend import resolve_backend
from pallas_kernels.decode_attention_kernel import DecodeConfig
from pallas_kernels.kv_write import write_kv
from pallas_kernels.ragged_attention_kernel import RaggedConfig
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.rotary_kv import rotary_write_kv
from ragged_batch import RaggedBatch, make_ragged_batch


def _compare(batch: RaggedBatch, out: jax.Array, ref: jax.Array, tol: float = 2e-5) -> None:
    real = batch.num_real_tokens
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.isfinite(out).all(), "an output element is NaN: unwritten or poisoned"
    np.testing.assert_allclose(out[:real], ref[:real], atol=tol, rtol=tol)
    assert (out[real:] == 0).all(), "padding tokens must get a zero output"


def _run(batch, *, decode_only, scale, window, cap, **configs):
    knobs = dict(scale=scale, sliding_window=window, soft_cap=cap)
    ref = ragged_paged_attention(*batch.args, **knobs, backend="reference")
    out = ragged_paged_attention(*batch.args, **knobs, decode_only=decode_only, backend="triton", interpret=True,
                                 **configs)
    return out, ref


RAGGED_CASES = [
    # q_lens, ctx_lens (not multiples of the page), N, K, H, B, window, soft_cap, config
    ([1, 3, 16, 17], [37, 3, 50, 17], 8, 8, 64, 16, None, None, RaggedConfig(block_rows=16, block_k=16)),
    ([255, 1, 3], [300, 45, 20], 16, 4, 128, 16, 40, None, RaggedConfig(block_rows=32, block_k=32)),
    ([17, 513], [70, 530], 16, 2, 64, 32, None, 20.0, RaggedConfig()),
    ([16, 1, 1], [16, 100, 33], 8, 4, 128, 16, 8, 30.0, RaggedConfig(block_rows=16, block_k=16)),
    ([3, 17, 1], [20, 40, 7], 9, 3, 80, 16, None, None, RaggedConfig()),  # SmolLM2: G = 3, head_dim 80
]


@pytest.mark.parametrize("q_lens,ctx_lens,n,k,h,b,window,cap,config", RAGGED_CASES)
def test_ragged_kernel_matches_reference(q_lens, ctx_lens, n, k, h, b, window, cap, config):
    batch = make_ragged_batch(q_lens, ctx_lens, num_q_heads=n, num_kv_heads=k, head_dim=h, page_size=b,
                              pad_tokens=3, pad_seqs=1, seed=len(q_lens) + h)
    out, ref = _run(batch, decode_only=False, scale=h ** -0.5, window=window, cap=cap, ragged_config=config)
    _compare(batch, out, ref)


DECODE_CASES = [
    # ctx_lens, N, K, H, B, window, soft_cap, config
    ([1, 17, 100, 33], 8, 8, 64, 16, None, None, DecodeConfig(block_k=16, num_splits=1)),
    ([5, 250, 63], 16, 2, 128, 32, 50, 30.0, DecodeConfig(block_k=16, num_splits=3)),
    ([20, 7, 300], 9, 3, 80, 16, None, None, DecodeConfig(block_k=32, num_splits=None, target_programs=8)),
]


@pytest.mark.parametrize("ctx_lens,n,k,h,b,window,cap,config", DECODE_CASES)
def test_decode_kernel_matches_reference(ctx_lens, n, k, h, b, window, cap, config):
    real = len(ctx_lens)
    batch = make_ragged_batch([1] * real, ctx_lens, num_q_heads=n, num_kv_heads=k, head_dim=h, page_size=b,
                              pad_tokens=2, pad_seqs=2, seed=real + h)
    # Padding sequences after the real ones, as the runner lays a decode step out: the split kernel's merged rows
    # are then in token order with no scatter (a kernel launch per layer saved).
    out, ref = _run(batch, decode_only=True, scale=h ** -0.5, window=window, cap=cap, decode_config=config)
    _compare(batch, out, ref)


def _poison_past_context(batch: RaggedBatch) -> RaggedBatch:
    """Every cache slot no sequence's context holds (the null block, spare pages, each last page's tail) -> NaN."""
    used = np.zeros(batch.k_pages.shape[1:3], bool)  # [P, B]
    page_size = used.shape[1]
    for table, length in zip(np.asarray(batch.block_tables), np.asarray(batch.seq_lens)):
        pos = np.arange(length)
        used[table[pos // page_size], pos % page_size] = True
    keep = jnp.asarray(used)[None, :, :, None]
    return dataclasses.replace(batch, k_pages=jnp.where(keep, batch.k_pages, jnp.nan),
                               v_pages=jnp.where(keep, batch.v_pages, jnp.nan))


@pytest.mark.parametrize("decode_only", [False, True])
def test_kernels_read_no_key_past_the_context(decode_only):
    """A context's last tile reads only the positions it has: the rest of its page and the null block behind it
    may hold anything, and 0 * NaN in p.v would poison the row (as a read of them would also cost bandwidth)."""
    q_lens = [1, 1, 1] if decode_only else [1, 5, 20]
    batch = make_ragged_batch(q_lens, [37, 100, 20], num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
                              pad_tokens=1 if decode_only else 3, pad_seqs=1, seed=7)
    knobs = dict(scale=0.125, sliding_window=None, soft_cap=None)
    ref = ragged_paged_attention(*batch.args, **knobs, backend="reference")
    out = ragged_paged_attention(*_poison_past_context(batch).args, **knobs, decode_only=decode_only,
                                 backend="triton", interpret=True, decode_config=DecodeConfig(block_k=32),
                                 ragged_config=RaggedConfig(block_rows=16, block_k=32))
    _compare(batch, out, ref)


def test_interpreter_poisons_outputs():
    """The premise of the tests above: an output the kernel never writes reads NaN in the interpreter."""

    def kernel(x_ref, o_ref):
        o_ref[0] = x_ref[0]

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((2, 16), jnp.float32), interpret=True)(
        jnp.ones((2, 16), jnp.float32))
    assert (np.asarray(out[0]) == 1).all() and np.isnan(np.asarray(out[1])).all()


def test_auto_backend_picks_from_the_device():
    cpu = jax.devices("cpu")[0]
    gpu = dataclasses.make_dataclass("FakeGpu", [("platform", str)])("gpu")
    assert resolve_backend("auto", gpu) == backend.TRITON
    assert resolve_backend("auto", cpu) == backend.XLA
    assert resolve_backend("auto") == backend.XLA  # this machine's first device is a CPU
    assert resolve_backend("reference", gpu) == backend.REFERENCE
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("mosaic")
    batch = make_ragged_batch([2, 1], [5, 9], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    auto = ragged_paged_attention(*batch.args, scale=0.125)
    ref = ragged_paged_attention(*batch.args, scale=0.125, backend="reference")
    np.testing.assert_allclose(np.asarray(auto), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_entry_rejects_bad_inputs():
    batch = make_ragged_batch([2, 1], [5, 9], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    q, k, v, tables, lens, qsl = batch.args
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ragged_paged_attention(q[:, :3], k, v, tables, lens, qsl, scale=1.0)
    with pytest.raises(ValueError, match="head_dim"):
        ragged_paged_attention(q[..., :32], k, v, tables, lens, qsl, scale=1.0)
    with pytest.raises(ValueError, match="disagree on the number of sequences"):
        ragged_paged_attention(q, k, v, tables, lens[:1], qsl, scale=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        ragged_paged_attention(*batch.args, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="decode_only needs one token per sequence"):
        ragged_paged_attention(*batch.args, scale=1.0, decode_only=True, backend="triton", interpret=True)


def test_configs_validate_and_fit():
    with pytest.raises(ValueError, match="block_k"):
        RaggedConfig(block_k=48)
    with pytest.raises(ValueError, match="num_splits"):
        DecodeConfig(num_splits=0)
    # One program per (sequence, kv head) once the batch fills the GPU; a lone long sequence is split.
    assert DecodeConfig().splits(64, 8, 4096) == 1
    assert DecodeConfig().splits(1, 8, 32768) == 64
    assert DecodeConfig().splits(1, 8, 100) == 1
    # bf16 d = 128 keeps its tiles; fp32 and d = 256 shrink them under the shared-memory limit.
    assert attention_tile.fit_shared_memory(128, 3, 128, 128, 2) == (128, 3)
    assert attention_tile.fit_shared_memory(128, 3, 128, 128, 4) == (32, 3)
    assert attention_tile.fit_shared_memory(128, 3, 128, 256, 2) == (32, 3)


def test_write_kv_writes_only_its_slots():
    batch = make_ragged_batch([3], [40], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    new_k = jax.random.normal(jax.random.key(1), (3, 2, 64))
    slots = jnp.array([17, 3, 40], jnp.int32)  # page * 16 + offset, any order
    k, v = write_kv(batch.k_pages, batch.v_pages, new_k, 2 * new_k, slots)
    flat_k, flat_v = np.asarray(k).reshape(2, -1, 64), np.asarray(v).reshape(2, -1, 64)
    np.testing.assert_array_equal(flat_k[:, slots], np.swapaxes(np.asarray(new_k), 0, 1))
    np.testing.assert_array_equal(flat_v[:, slots], 2 * np.swapaxes(np.asarray(new_k), 0, 1))
    untouched = np.setdiff1d(np.arange(flat_k.shape[1]), np.asarray(slots))
    old = np.asarray(batch.k_pages).reshape(2, -1, 64)
    np.testing.assert_array_equal(flat_k[:, untouched], old[:, untouched])


@pytest.mark.parametrize("tokens,n,k,h,dtype", [
    (5, 8, 2, 64, jnp.float32),
    (4, 9, 3, 80, jnp.float32),  # head counts and half widths that are not powers of 2: masked rows and columns
    (6, 32, 8, 128, jnp.bfloat16),  # Llama-3.1-8B's heads
])
def test_rotary_write_kv_kernel_matches_the_expression(tokens, n, k, h, dtype):
    rng = np.random.default_rng(tokens * h)
    pages, page_size, padding = 5, 4, 2
    qkv = jnp.asarray(rng.normal(size=(tokens + padding, (n + 2 * k) * h)), dtype)
    angles = rng.uniform(0, 100, (tokens + padding, h // 2))
    cos, sin = jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(k, pages, page_size, h)), dtype) for _ in range(2))
    # Real tokens in any order over pages 1..; the padding tokens all write slot 0, in the null block.
    slots = np.concatenate([rng.permutation(np.arange(page_size, pages * page_size))[:tokens], [0] * padding])
    args = (qkv, cos, sin, k_pages, v_pages, jnp.asarray(slots, jnp.int32))
    want = rotary_write_kv(*args, num_q_heads=n, backend="reference")
    got = rotary_write_kv(*args, num_q_heads=n, backend="triton", interpret=True)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2  # bf16: one rounding of the rotated value apart at most
    q, want_q = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    assert np.isfinite(q).all(), "a q element is unwritten"
    np.testing.assert_allclose(q, want_q, rtol=tol, atol=tol)
    for pages_got, pages_want in zip(got[1:], want[1:]):  # block 0 aside: the padding's writes race there
        np.testing.assert_allclose(np.asarray(pages_got, np.float32)[:, 1:], np.asarray(pages_want, np.float32)[:, 1:],
                                   rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(got[2])[:, 1:], np.asarray(want[2])[:, 1:])  # v is copied, not computed
    with pytest.raises(ValueError, match="q-heads"):
        rotary_write_kv(qkv[:, :-2], *args[1:], num_q_heads=n, backend="reference")


@pytest.mark.parametrize("q_lens,ctx_lens,n,k,h,b,window,cap,config", RAGGED_CASES)
def test_chunked_xla_path_matches_reference(q_lens, ctx_lens, n, k, h, b, window, cap, config):
    """The CPU serving path (backend "xla": walks each token's real context in chunks) on the same cases."""
    batch = make_ragged_batch(q_lens, ctx_lens, num_q_heads=n, num_kv_heads=k, head_dim=h, page_size=b,
                              pad_tokens=3, pad_seqs=1, seed=len(q_lens) + h + 1)
    knobs = dict(scale=h ** -0.5, sliding_window=window, soft_cap=cap)
    ref = ragged_paged_attention(*batch.args, **knobs, backend="reference")
    _compare(batch, ragged_paged_attention(*batch.args, **knobs, backend="xla"), ref)


@pytest.mark.parametrize("tokens,hidden,dtype", [(1, 64, jnp.float32), (5, 256, jnp.float32), (37, 128, jnp.bfloat16),
                                                 (3, 16, jnp.bfloat16)])
def test_add_rms_norm_kernel_matches_the_expression(tokens, hidden, dtype):
    rng = np.random.default_rng(tokens * hidden)
    x, h = (jnp.asarray(rng.normal(0, 3, (tokens, hidden)), dtype) for _ in range(2))
    weight = jnp.asarray(1 + 0.1 * rng.normal(size=hidden), dtype)
    total, normed = add_rms_norm_triton(x, h, weight, eps=1e-5, interpret=True)
    want_total = x + h
    want = rms_norm(want_total, weight, 1e-5)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(want_total))
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: one rounding step of the normed value at most
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    assert np.isfinite(np.asarray(normed, np.float32)).all()


def test_add_rms_norm_layer_takes_the_expression_where_the_kernel_does_not_fit():
    assert fused_norm.supports(4096) and fused_norm.supports(16)
    assert not fused_norm.supports(576) and not fused_norm.supports(8)  # SmolLM2-135M's hidden size: XLA's path
    rng = np.random.default_rng(0)
    x, h = (jnp.asarray(rng.normal(size=(3, 576)), jnp.float32) for _ in range(2))
    weight = jnp.asarray(rng.normal(size=576), jnp.float32)
    total, normed = add_rms_norm(x, h, weight, 1e-6, backend="triton")  # no GPU needed: the kernel is not called
    np.testing.assert_array_equal(np.asarray(total), np.asarray(x + h))
    np.testing.assert_array_equal(np.asarray(normed), np.asarray(rms_norm(x + h, weight, 1e-6)))
    with pytest.raises(ValueError, match="power-of-2"):
        add_rms_norm_triton(x, h, weight, eps=1e-6, interpret=True)
