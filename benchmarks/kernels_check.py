"""GPU correctness of the Pallas kernels (ragged and decode attention with its merge; rotary + KV write; the fused
residual add + RMSNorm) against the jnp reference; run before every kernel timing.

    PYTHONPATH=. python3 benchmarks/kernels_check.py [--out DIR] [--kernels ragged,decode,rotary_write_kv,add_rms_norm]

Each case draws fresh random data, fills freed device memory with NaN first (so an output element the kernel
forgets to write most likely reads NaN), runs the kernel and the reference in float32 on the same inputs, and
compares the real tokens by ||out - ref|| / ||ref||: bf16/fp16 must be <= 1e-2, fp32 <= 1e-4. Exit status 1 on
any failure.
"""

import argparse
import functools
import itertools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.layers import rms_norm
from pallas_kernels.add_rms_norm_kernel import add_rms_norm_triton
from pallas_kernels.ragged_attention_kernel import RaggedConfig
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention_reference import ragged_paged_attention_reference
from pallas_kernels.rotary_kv import rotary_write_kv
from tests.ragged_batch import make_ragged_batch

TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}


def poison_free_memory(num_bytes: int = 1 << 30) -> None:
    """Leave NaN in memory the allocator is about to hand out again."""
    jnp.full((num_bytes // 4,), jnp.nan, jnp.float32).block_until_ready()


def cases():
    """(name, q_lens, ctx_lens, N, K, H, B, window, cap, dtype, decode_only[, RaggedConfig]): the issue's
    parameter product, trimmed."""
    mixed_q = [1, 3, 16, 17, 255, 513]
    mixed_ctx = [37, 100, 16, 530, 300, 1100]  # not multiples of the block size; 16 = a fresh prefill
    decode_ctx = [1, 17, 1000, 4099, 33, 250]
    # Window and soft-cap alternate over the head configurations (each is on for half of them), to keep the
    # number of compiles, and so the device time, down.
    toggles = itertools.cycle([(None, None), (64, 30.0), (None, 30.0), (200, None)])
    for ((n, k), h), (window, cap) in zip(itertools.product([(8, 8), (32, 8), (64, 8)], [64, 128]), toggles):
        yield ("mixed", mixed_q, mixed_ctx, n, k, h, 16, window, cap, "bfloat16", False)
        yield ("decode", [1] * 6, decode_ctx, n, k, h, 16, window, cap, "bfloat16", True)
    for dtype, decode in itertools.product(["float32", "float16"], [False, True]):
        yield ("dtype", [1] * 6 if decode else mixed_q, decode_ctx if decode else mixed_ctx, 32, 8, 128, 32,
               None, None, dtype, decode)
    for h, b in [(80, 16), (96, 64), (256, 16)]:
        yield ("head_dim", mixed_q, mixed_ctx, 16, 2, h, b, None, None, "bfloat16", False)
        yield ("head_dim", [1] * 6, decode_ctx, 16, 2, h, b, None, None, "bfloat16", True)
    for dtype, cap in [("bfloat16", None), ("float16", 30.0)]:
        yield ("half_exp", mixed_q, mixed_ctx, 32, 8, 128, 16, 64, cap, dtype, False, RaggedConfig(half_exp=True))
    yield ("long_decode", [1], [32768], 32, 8, 128, 16, None, None, "bfloat16", True)
    yield ("long_prefill", [2048, 1], [4096, 5000], 32, 8, 128, 16, None, None, "bfloat16", False)


def run_case(case, seed):
    name, q_lens, ctx_lens, n, k, h, b, window, cap, dtype, decode, *config = case
    # Decode batches are padded as the runner pads them: T == S, padding sequences' tokens after the real ones.
    batch = make_ragged_batch(q_lens, ctx_lens, num_q_heads=n, num_kv_heads=k, head_dim=h, page_size=b,
                              dtype=jnp.dtype(dtype), pad_tokens=2 if decode else 3, pad_seqs=2 if decode else 1,
                              seed=seed)
    knobs = dict(scale=h ** -0.5, sliding_window=window, soft_cap=cap)
    poison_free_memory()
    out = ragged_paged_attention(*batch.args, **knobs, decode_only=decode, backend="triton",
                                 ragged_config=config[0] if config else None)
    f32 = [a.astype(jnp.float32) if a.dtype != jnp.int32 else a for a in batch.args]
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(ragged_paged_attention_reference, static_argnames=tuple(knobs))(*f32, **knobs)
    real = batch.num_real_tokens
    out32, ref32 = np.asarray(out.astype(jnp.float32)), np.asarray(ref)
    err = float(np.linalg.norm(out32[:real] - ref32[:real]) / np.linalg.norm(ref32[:real]))
    pad_ok = bool(np.all(out32[real:] == 0))
    ok = bool(np.isfinite(out32).all()) and err <= TOLERANCE[dtype] and pad_ok
    return dict(name=name, config=repr(config[0]) if config else "default", q_lens=q_lens, ctx_lens=ctx_lens,
                heads=f"{n}/{k}", head_dim=h, block=b, window=window, soft_cap=cap, dtype=dtype, decode_only=decode,
                rel_err=err, padding_zero=pad_ok, ok=ok)


def norm_cases():
    """(T, D, dtype) for the fused residual add + RMSNorm: batch-1 decode to a full prefill step."""
    for tokens, hidden in itertools.product([1, 7, 300, 8192], [2048, 4096, 8192]):
        yield tokens, hidden, "bfloat16"
    yield 33, 4096, "float32"


def run_norm_case(case, seed):
    """add_rms_norm_triton against the XLA expression the model runs elsewhere, on the same GPU and inputs."""
    tokens, hidden, dtype = case
    keys = jax.random.split(jax.random.key(seed), 3)
    x, h = (jax.random.normal(k, (tokens, hidden), dtype) * 3 for k in keys[:2])
    weight = (1 + 0.1 * jax.random.normal(keys[2], (hidden,))).astype(dtype)
    poison_free_memory()
    total, normed = jax.jit(functools.partial(add_rms_norm_triton, eps=1e-5))(x, h, weight)
    want_total = x + h
    want = jax.jit(rms_norm, static_argnames="eps")(want_total, weight, 1e-5)
    got, want = np.asarray(normed.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    sum_exact = bool(np.array_equal(np.asarray(total), np.asarray(want_total)))
    ok = bool(np.isfinite(got).all()) and sum_exact and err <= TOLERANCE[dtype]
    return dict(name="add_rms_norm", tokens=tokens, hidden=hidden, dtype=dtype, rel_err=err, sum_exact=sum_exact,
                normed_equal=float(np.mean(got == want)), ok=ok)


def rotary_cases():
    """(T, N, K, H, dtype) for rotary + KV write: Llama-3.1-8B's heads from batch-1 decode to a full prefill step,
    70B's and 70B's per device at tensor parallelism 4, and head counts that are not powers of 2."""
    for tokens in [1, 7, 300, 8192]:
        yield tokens, 32, 8, 128, "bfloat16"
    for n, k, h in [(64, 8, 128), (16, 2, 128), (9, 3, 64), (14, 2, 64)]:
        yield 65, n, k, h, "bfloat16"
    yield 33, 32, 8, 128, "float32"


def run_rotary_case(case, seed):
    """rotary_write_kv's kernel against its jnp expression on the same GPU and inputs: the rotated q, the pages
    (each real token's slot; every other slot must keep its value) outside the null block, where padding writes."""
    tokens, n, k, h, dtype = case
    page_size, padding = 16, 2
    pages = tokens // page_size + 8
    keys = jax.random.split(jax.random.key(seed), 5)
    qkv = jax.random.normal(keys[0], (tokens + padding, (n + 2 * k) * h), dtype)
    angles = jax.random.uniform(keys[1], (tokens + padding, h // 2), maxval=1000.0)
    cos, sin = jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)
    k_pages, v_pages = (jax.random.normal(key, (k, pages, page_size, h), dtype) for key in keys[2:4])
    slots = jnp.concatenate([jax.random.permutation(keys[4], jnp.arange(page_size, pages * page_size))[:tokens],
                             jnp.zeros(padding, jnp.int32)]).astype(jnp.int32)
    args = (qkv, cos, sin, k_pages, v_pages, slots)
    poison_free_memory()
    got = jax.jit(functools.partial(rotary_write_kv, num_q_heads=n, backend="triton"))(*args)
    want = jax.jit(functools.partial(rotary_write_kv, num_q_heads=n, backend="reference"))(*args)
    got, want = ([np.asarray(a.astype(jnp.float32)) for a in out] for out in (got, want))
    got[1:], want[1:] = [a[:, 1:] for a in got[1:]], [a[:, 1:] for a in want[1:]]
    errs = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(got, want)]
    v_exact = bool(np.array_equal(got[2], want[2]))
    ok = all(np.isfinite(a).all() for a in got) and v_exact and max(errs) <= TOLERANCE[dtype]
    return dict(name="rotary_write_kv", tokens=tokens, heads=f"{n}/{k}", head_dim=h, dtype=dtype, rel_err=max(errs),
                v_exact=v_exact, q_equal=float(np.mean(got[0] == want[0])), ok=ok)


def decode_cases():
    return (case for case in cases() if case[10])


def ragged_cases():
    return (case for case in cases() if not case[10])


KERNELS = {"ragged": (run_case, ragged_cases), "decode": (run_case, decode_cases),
           "rotary_write_kv": (run_rotary_case, rotary_cases),
           "add_rms_norm": (run_norm_case, norm_cases)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="folder for kernels_check.json")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"which to check, of {','.join(KERNELS)}")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    results, start = [], time.time()
    runs = [(KERNELS[name][0], case) for name in args.kernels.split(",") for case in KERNELS[name][1]()]
    for seed, (run, case) in enumerate(runs):
        try:
            row = run(case, seed)
        except Exception as e:  # a compile failure is a failed case, reported with the rest
            row = dict(name=run.__name__, case=repr(case), ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        results.append(row)
        print(("ok  " if row["ok"] else "FAIL"), {k: v for k, v in row.items() if k != "ok"}, flush=True)
    failed = [r for r in results if not r["ok"]]
    worst = {d: max((r["rel_err"] for r in results if r.get("dtype") == d and "rel_err" in r), default=None)
             for d in TOLERANCE}
    print(f"kernels_check: {len(results) - len(failed)}/{len(results)} passed in {time.time() - start:.0f} s; "
          f"worst rel err {worst}", flush=True)
    if args.out:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out, "kernels_check.json").write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
