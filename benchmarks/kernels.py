"""Kernel timings on the GPU: the card's ceilings, paged decode attention and causal prefill, with baselines.

    PYTHONPATH=. python3 benchmarks/kernels.py [--sweep] [--out DIR]
    PYTHONPATH=. python3 benchmarks/kernels.py --step-shapes 256x1030,64x1030 [--out DIR]

Prints, in one run: measured copy bandwidth (read + write) and bf16 matmul rate; decode attention at 32 q / 8 kv
heads, d = 128, block 16, batch 1/8/64/256 x context 1k/4k/16k/32k (us and KV bytes read per second) for
jaxllm's kernel, JAX's own jax.experimental.pallas.ops.gpu.paged_attention and the XLA reference; causal prefill
TFLOP/s at 1k/4k/8k (one sequence, all of its K/V in pages) with JAX's own flash attention (mha, unpaged) as
baseline; and the time of write_kv on a donated cache. --sweep also times tuning variants and runs the tables with
the fastest. Timings are medians of 3 runs of jitted chains of 8 calls (see chain_time), each call's input made
to depend on the last output; KV caches hold random data. --step-shapes times only the decode tuning variants at
the given batch x context shapes, with contexts that need not be a multiple of the tile and a cache three times
the pages the block tables use.
"""

import argparse
import dataclasses
import functools
import gc
import json
import math
import pathlib
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.roofline import copy_bandwidth, matmul_rate, read_bandwidth
from pallas_kernels.decode_attention_kernel import DecodeConfig
from pallas_kernels.kv_write import write_kv
from pallas_kernels.ragged_attention_kernel import RaggedConfig
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention_reference import ragged_paged_attention_reference

warnings.filterwarnings("ignore", category=DeprecationWarning)
from jax.experimental.pallas.ops.gpu import attention as jax_attention  # noqa: E402
from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # noqa: E402

N_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
REFERENCE_MAX_KV_BYTES = 2.2e9  # the gather reference materialises f32 context: skip it above this


def chain_time(fn, args, *, inner=8, target_s=0.15, repeats=3) -> float:
    """Seconds per call of fn(*args): one jitted executable chains `inner` calls, each call's first argument
    taking one element from the sum of the previous output (so XLA can neither hoist nor trim a call), and is
    dispatched back to back until about target_s of device work is queued. No while loop: on the GPU each of its
    iterations waits on the host for the predicate, which would add ~10 us to every call.
    """

    @jax.jit
    def run(args):
        for _ in range(inner):
            out = fn(*args)
            x = args[0]
            at = (0,) * x.ndim
            x = x.at[at].set(x[at] + (jnp.sum(out.astype(jnp.float32)) * 0).astype(x.dtype))
            args = (x, *args[1:])
        return args[0]

    jax.block_until_ready(run(args))  # compile + warm up
    start = time.perf_counter()
    jax.block_until_ready(run(args))
    calls = max(1, min(200, int(target_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            x = run(args)
        jax.block_until_ready(x)
        times.append((time.perf_counter() - start) / (calls * inner))
    return float(np.median(times))


@functools.partial(jax.jit, static_argnames=("num_pages", "seed"))
def random_pages(num_pages: int, seed: int) -> jax.Array:
    """[K, P, B, H] bf16 of random values: one random slab tiled (tile and slice fuse into one pass), so a 34 GB
    cache needs neither 68 GB of RNG bits nor a second copy."""
    slab = min(num_pages, 16384)
    base = jax.random.normal(jax.random.key(seed), (KV_HEADS, slab, PAGE, HEAD_DIM), jnp.bfloat16)
    return jnp.tile(base, (1, -(-num_pages // slab), 1, 1))[:, :num_pages]


@dataclasses.dataclass
class DecodeShape:
    batch: int
    context: int
    cache_factor: int = 1  # the cache holds this many times the pages the tables use, as an engine's does
    # "random": the used pages scattered over the cache; "ascending": each sequence's pages one after another, the
    # sequences in turn, as the engine's block manager hands out a fresh cache's blocks.
    page_order: str = "random"

    def build(self):
        pages_per_seq = -(-self.context // PAGE)
        num_pages = 1 + self.batch * pages_per_seq * self.cache_factor
        used = np.arange(num_pages - 1)
        if self.page_order == "random":
            used = np.random.default_rng(self.batch * 7 + self.context).permutation(used)
        elif self.page_order != "ascending":
            raise ValueError(f"page order {self.page_order!r}: random or ascending")
        used = used[:self.batch * pages_per_seq]
        tables = (1 + used).reshape(self.batch, pages_per_seq).astype(np.int32)
        q = jax.random.normal(jax.random.key(3), (self.batch, N_HEADS, HEAD_DIM), jnp.bfloat16)
        return dict(q=q, k=random_pages(num_pages, 4), v=random_pages(num_pages, 5), tables=jnp.asarray(tables),
                    lens=jnp.full((self.batch,), self.context, jnp.int32),
                    qsl=jnp.arange(self.batch + 1, dtype=jnp.int32))

    @property
    def kv_bytes(self) -> int:
        return self.batch * self.context * KV_HEADS * HEAD_DIM * 2 * 2


def time_decode(shape: DecodeShape, impls: dict, data=None) -> dict:
    d = data or shape.build()
    scale = HEAD_DIM ** -0.5
    fns = {
        "jaxllm": lambda q, k, v, t, n, s, cfg=None: ragged_paged_attention(
            q, k, v, t, n, s, scale=scale, decode_only=True, backend="triton", decode_config=cfg),
        "jax_paged_attention": lambda q, k, v, t, n, s: jax_paged.paged_attention(q * scale, k, v, t, n),
        "xla_reference": lambda q, k, v, t, n, s: ragged_paged_attention_reference(q, k, v, t, n, s, scale=scale),
    }
    args = (d["q"], d["k"], d["v"], d["tables"], d["lens"], d["qsl"])
    out = {}
    for name, cfg in impls.items():
        base = name.split(":")[0]
        if base == "xla_reference" and shape.kv_bytes > REFERENCE_MAX_KV_BYTES:
            continue
        fn = fns[base] if cfg is None else (lambda *a, cfg=cfg: fns["jaxllm"](*a, cfg=cfg))
        try:
            seconds = chain_time(fn, args)
            out[name] = dict(us=seconds * 1e6, kv_tbps=shape.kv_bytes / seconds / 1e12)
        except Exception as e:  # report and go on: one failing variant must not lose the run
            out[name] = dict(error=f"{type(e).__name__}: {e}"[:500])
    return out


def time_prefill(length: int, configs: dict) -> dict:
    pages = length // PAGE
    key = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(key[0], (length, N_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(key[1], (KV_HEADS, pages + 1, PAGE, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(key[2], (KV_HEADS, pages + 1, PAGE, HEAD_DIM), jnp.bfloat16)
    tables = jnp.asarray(1 + np.random.default_rng(length).permutation(pages), jnp.int32)[None]
    lens, qsl = jnp.array([length], jnp.int32), jnp.array([0, length], jnp.int32)
    flops = 2 * N_HEADS * HEAD_DIM * length * length  # causal: half of 4 * N * H * L^2
    scale = HEAD_DIM ** -0.5
    out = {}
    for name, cfg in configs.items():
        if name == "xla_reference":
            def fn(q, k, v):
                return ragged_paged_attention_reference(q, k, v, tables, lens, qsl, scale=scale)
        elif name == "jax_mha_unpaged":
            def fn(q, k, v):  # JAX's flash attention on contiguous K/V, kv heads repeated to the q heads
                kc = jnp.repeat(k[:, 1:].reshape(KV_HEADS, length, HEAD_DIM), N_HEADS // KV_HEADS, axis=0)
                vc = jnp.repeat(v[:, 1:].reshape(KV_HEADS, length, HEAD_DIM), N_HEADS // KV_HEADS, axis=0)
                return jax_attention.mha(q[None], jnp.swapaxes(kc, 0, 1)[None], jnp.swapaxes(vc, 0, 1)[None],
                                         None, sm_scale=scale, causal=True)
        else:
            def fn(q, k, v, cfg=cfg):
                return ragged_paged_attention(q, k, v, tables, lens, qsl, scale=scale, backend="triton",
                                              ragged_config=cfg)
        try:
            slow = name == "xla_reference"
            seconds = chain_time(fn, (q, k, v), inner=2 if slow else 8, target_s=0.1, repeats=2 if slow else 3)
            out[name] = dict(us=seconds * 1e6, tflops=flops / seconds / 1e12)
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {e}"[:500])
    return out


def time_write_kv() -> dict:
    """write_kv of 64 new tokens into a donated 2 GB cache, 8 writes chained in one executable: microseconds if
    in place, ~0.5 ms each if XLA copied the cache."""
    shape = DecodeShape(64, 4096)
    d = shape.build()
    new = jax.random.normal(jax.random.key(9), (64, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    rng = np.random.default_rng(0)
    slots = [jnp.asarray(rng.choice(d["k"].shape[1] * PAGE, 64, replace=False), jnp.int32) for _ in range(8)]

    @functools.partial(jax.jit, donate_argnames=("k", "v"))
    def step(k, v):
        for s in slots:
            k, v = write_kv(k, v, new, new, s)
        return k, v

    k, v = step(d.pop("k"), d.pop("v"))
    jax.block_until_ready(k)
    start = time.perf_counter()
    for _ in range(20):
        k, v = step(k, v)
    jax.block_until_ready(k)
    seconds = (time.perf_counter() - start) / (20 * len(slots))
    return dict(us=seconds * 1e6, cache_bytes=2 * k.nbytes)


def _decode(block_k, warps, stages, splits=None):
    return DecodeConfig(block_k=block_k, num_warps=warps, num_stages=stages, num_splits=splits)


DECODE_VARIANTS = {  # name: c block_k, w warps, s stages, x splits (auto when absent)
    f"jaxllm:c{c}w{w}s{s}" + (f"x{x}" if x else ""): _decode(c, w, s, x)
    for c, w, s, x in [(64, 4, 4, None), (64, 4, 3, None), (128, 8, 3, None), (64, 4, 4, 2)]
}
STEP_VARIANTS = {  # the same names, for the shapes of an engine's decode step (--step-shapes)
    f"jaxllm:c{c}w{w}s{s}": _decode(c, w, s)
    for c, w, s in [(64, 4, 4), (64, 4, 3), (64, 4, 2), (32, 4, 4), (32, 2, 4), (64, 8, 4), (128, 8, 2), (16, 2, 4)]
}
PREFILL_VARIANTS = {  # name: r block_rows, c block_k, w warps, s stages, e: exp2 in bf16 pairs
    f"jaxllm:r{r}c{c}w{w}s{s}" + ("e" if e else ""): RaggedConfig(block_rows=r, block_k=c, num_warps=w,
                                                                  num_stages=s, half_exp=e)
    for r, c, w, s, e in [(128, 128, 8, 3, False), (128, 128, 8, 3, True), (64, 64, 4, 2, False),
                          (64, 64, 4, 2, True), (128, 128, 8, 2, True), (128, 64, 4, 2, True)]
}


def fastest(results: dict, variants: dict, default):
    """The variant with the lowest time (splits left automatic), or the default if none ran."""
    timed = [(row["us"], name) for name, row in results.items()
             if "us" in row and name in variants and getattr(variants[name], "num_splits", None) is None]
    return (min(timed)[1], variants[min(timed)[1]]) if timed else ("default", default)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time tuning variants")
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--step-shapes", default=None, metavar="BxC,...",
                        help="time only the decode variants at these shapes, in a cache 3x the pages used "
                             "(an engine step's contexts are rarely a multiple of the tile), then stop")
    parser.add_argument("--page-orders", default="random", metavar="random,ascending",
                        help="with --step-shapes: the orders of the used pages in the cache (DecodeShape)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    report = dict(device=device.device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
    print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)

    def save():
        if args.out:
            pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out, "kernels.json").write_text(json.dumps(report, indent=1))

    report["copy_tbps"] = copy_bandwidth() / 1e12
    report["read_tbps"] = read_bandwidth() / 1e12
    report["matmul_tflops"] = matmul_rate() / 1e12
    print(f"copy {report['copy_tbps']:.2f} TB/s, read {report['read_tbps']:.2f} TB/s, "
          f"bf16 matmul {report['matmul_tflops']:.0f} TFLOP/s", flush=True)
    report["write_kv"] = time_write_kv()
    print("write_kv", report["write_kv"], flush=True)
    save()

    if args.step_shapes:
        report["decode_step_shapes"] = {}
        for shape in args.step_shapes.split(","):
            batch, context = map(int, shape.split("x"))
            for order in args.page_orders.split(","):
                row = time_decode(DecodeShape(batch, context, cache_factor=3, page_order=order), STEP_VARIANTS)
                name = shape if order == "random" else f"{shape} {order}"
                report["decode_step_shapes"][name] = row
                print(f"decode step shape {name}", json.dumps(row), flush=True)
                save()
        return report

    decode_cfg, prefill_cfg = DecodeConfig(), RaggedConfig()
    report["decode_config"], report["prefill_config"] = "default", "default"
    if args.sweep:
        sweep = time_decode(DecodeShape(64, 4096), {"jax_paged_attention": None, **DECODE_VARIANTS})
        report["decode_sweep_64x4k"] = sweep
        print("decode sweep 64x4k", json.dumps(sweep), flush=True)
        report["decode_config"], decode_cfg = fastest(sweep, DECODE_VARIANTS, decode_cfg)
        report["decode_sweep_1x32k"] = time_decode(DecodeShape(1, 32768), {
            "jaxllm:auto": decode_cfg, **{f"jaxllm:x{x}": dataclasses.replace(decode_cfg, num_splits=x)
                                          for x in (32, 64, 128)}})
        print("decode sweep 1x32k", json.dumps(report["decode_sweep_1x32k"]), flush=True)
        sweep = time_prefill(4096, PREFILL_VARIANTS)
        report["prefill_sweep_4k"] = sweep
        print("prefill sweep 4k", json.dumps(sweep), flush=True)
        report["prefill_config"], prefill_cfg = fastest(sweep, PREFILL_VARIANTS, prefill_cfg)
        print("tables use", report["decode_config"], report["prefill_config"], flush=True)
        save()

    report["decode"] = {}
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            shape = DecodeShape(batch, context)
            row = time_decode(shape, {"jaxllm": decode_cfg, "jax_paged_attention": None, "xla_reference": None})
            report["decode"][f"{batch}x{context}"] = row
            gc.collect()
            print(f"decode {batch}x{context}", json.dumps(row), flush=True)
            save()
    report["prefill"] = {}
    for length in (1024, 4096, 8192):
        report["prefill"][length] = time_prefill(length, {"jaxllm": prefill_cfg, "jax_mha_unpaged": None,
                                                          "xla_reference": None})
        print(f"prefill {length}", json.dumps(report["prefill"][length]), flush=True)
        save()

    print_table(report)


def print_table(report):
    copy = report["copy_tbps"]
    print(f"\n{report['device']} | copy {copy:.2f} TB/s | read {report['read_tbps']:.2f} TB/s | "
          f"bf16 matmul {report['matmul_tflops']:.0f} TFLOP/s | "
          f"decode {report.get('decode_config')} | prefill {report.get('prefill_config')}")
    print(f"{'decode BxC':>12} {'jaxllm us':>10} {'TB/s':>6} {'%copy':>6} {'%read':>6} {'jax us':>9} {'TB/s':>6} "
          f"{'x jax':>6} {'xla us':>9}")
    for key, row in report["decode"].items():
        ours, theirs, xla = (row.get(n, {}) for n in ("jaxllm", "jax_paged_attention", "xla_reference"))
        if "us" not in ours:
            print(f"{key:>12} {ours.get('error', '')[:90]}")
            continue
        speedup = theirs["us"] / ours["us"] if "us" in theirs else math.nan
        print(f"{key:>12} {ours['us']:10.1f} {ours['kv_tbps']:6.2f} {100 * ours['kv_tbps'] / copy:5.0f}% "
              f"{100 * ours['kv_tbps'] / report['read_tbps']:5.0f}% "
              f"{theirs.get('us', math.nan):9.1f} {theirs.get('kv_tbps', math.nan):6.2f} {speedup:6.2f} "
              f"{xla.get('us', math.nan):9.1f}")
    print(f"{'prefill L':>12} {'jaxllm TF/s':>12} {'%mm':>5} {'jax mha TF/s':>13} {'xla TF/s':>9}")
    for length, row in report["prefill"].items():
        ours = row.get("jaxllm", {})
        print(f"{length:>12} {ours.get('tflops', math.nan):12.1f} "
              f"{100 * ours.get('tflops', math.nan) / report['matmul_tflops']:4.0f}% "
              f"{row.get('jax_mha_unpaged', {}).get('tflops', math.nan):13.1f} "
              f"{row.get('xla_reference', {}).get('tflops', math.nan):9.2f}")
    print("write_kv (donated):", f"{report['write_kv']['us']:.1f} us")


if __name__ == "__main__":
    main()
