"""The weight-only quantized matmul kernel alone at Llama-3.1-8B's projection shapes, against the bf16 XLA dot.

    PYTHONPATH=. python3 -m benchmarks.quant_kernel [--rows 1 16 64 256 1024] [--output-json FILE]
    PYTHONPATH=. python3 -m benchmarks.quant_kernel --smoke --output-json FILE   # CPU: a tiny shape, interpreted

For each projection (qkv 4096x6144, o 4096x4096, gate_up 4096x28672, down 14336x4096) and M rows: microseconds
per call of x @ w in bf16 (XLA), of the Pallas kernel with int4 group-128 weights and with int8 per-channel
weights, the kernel's speed-up over bf16, and the rate at which it streams its packed bytes (qweight, scales and
zeros) as GB/s and as a fraction of the copy bandwidth measured in the same run (a decode-sized M should stream
near it). Timings are benchmarks.kernels.chain_time's (medians of jitted chains of calls); weights are random
words, scales and zeros random in their usual ranges. --smoke runs one tiny shape through the CPU interpreter,
without the copy bandwidth (a 4 GiB array): it checks the script, not the numbers.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.kernels import chain_time
from benchmarks.roofline import copy_bandwidth, device_name
from pallas_kernels.quant_matmul import quant_matmul

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # K, N
SMOKE_SHAPES = {"tiny": (256, 96)}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    bits: int
    group_size: int | None  # None: per-channel (one group of K rows)


VARIANTS = (Variant("int4_g128", 4, 128), Variant("int8_channel", 8, None))


def random_quantized(k: int, n: int, variant: Variant, seed: int):
    """(qweight i32[K / E, N], scales f16[K / G, N], zeros f16[K / G, N]): random words, scales ~ 0.01, zeros
    around the middle of the range (GPTQ's asymmetric zeros)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    e = 32 // variant.bits
    groups = k // (variant.group_size or k)
    qweight = jax.lax.bitcast_convert_type(jax.random.bits(keys[0], (k // e, n), jnp.uint32), jnp.int32)
    scales = jax.random.uniform(keys[1], (groups, n), jnp.float32, 0.005, 0.015).astype(jnp.float16)
    mid = 2 ** (variant.bits - 1)
    zeros = jax.random.randint(keys[2], (groups, n), mid - 2, mid + 2).astype(jnp.float16)
    return qweight, scales, zeros


def time_shape(k: int, n: int, m: int, *, interpret: bool, timing: dict) -> list[dict]:
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(k + n), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    bf16_s = chain_time(lambda x, w: x @ w, (x, w), **timing)
    del w
    rows = []
    for variant in VARIANTS:
        qweight, scales, zeros = random_quantized(k, n, variant, seed=m + n)
        fn = functools.partial(quant_matmul, bits=variant.bits, backend="triton", interpret=interpret)
        seconds = chain_time(fn, (x, qweight, scales, zeros), **timing)
        packed = qweight.nbytes + scales.nbytes + zeros.nbytes
        rows.append({"variant": variant.name, "bits": variant.bits, "group_size": variant.group_size or k,
                     "us": seconds * 1e6, "bf16_us": bf16_s * 1e6, "speedup_vs_bf16": bf16_s / seconds,
                     "packed_bytes": packed, "packed_gbs": packed / seconds / 1e9})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 1024], help="M values")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape in the CPU interpreter")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    rows_m = [1] if args.smoke else args.rows
    timing = dict(inner=2, target_s=0.01, repeats=1) if args.smoke else {}
    copy_gbs = None if args.smoke else copy_bandwidth() / 1e9
    print(f"{device_name()}: copy bandwidth {copy_gbs if copy_gbs is None else f'{copy_gbs:.0f} GB/s'}", flush=True)
    results = []
    for name, (k, n) in shapes.items():
        for m in rows_m:
            for row in time_shape(k, n, m, interpret=args.smoke, timing=timing):
                row = {"shape": name, "k": k, "n": n, "m": m, **row,
                       "copy_fraction": None if copy_gbs is None else row["packed_gbs"] / copy_gbs}
                results.append(row)
                fraction = "" if copy_gbs is None else f" ({row['copy_fraction']:.0%} of copy)"
                print(f"{name:8s} {k:5d}x{n:<5d} M={m:<5d} {row['variant']:13s} {row['us']:9.1f} us  bf16 "
                      f"{row['bf16_us']:9.1f} us  x{row['speedup_vs_bf16']:.2f}  {row['packed_gbs']:7.1f} GB/s"
                      f"{fraction}", flush=True)
    report = {"device": device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "copy_bandwidth_gbs": copy_gbs, "smoke": args.smoke, "results": results}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
