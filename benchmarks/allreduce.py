"""All-reduce latency under tensor parallelism: NCCL against XLA's collective kernels, async against sync.

    PYTHONPATH=. python3 benchmarks/allreduce.py [--tp 2 8] [--hidden 8192] [--output-json FILE]
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. python3 benchmarks/allreduce.py

A TP decode step all-reduces [T, D] bf16 activations twice per layer (65 times a step for a 32-layer 8B Llama), so
at small T its time is these all-reduces' fixed cost. For each tp and T in 1, 8, 64, 256 this times one jitted chain
of 32 dependent all-reduces (psum over "tp" under shard_map, unrolled: no while loop, whose every iteration would
wait on the host) and reports microseconds per all-reduce, the median of 5 repeats of back-to-back calls timed with
block_until_ready. Between two all-reduces each device multiplies tanh(x) by its own weights, so every all-reduce
sums different data on each device and depends on the last (the compiled program keeps all 32); that elementwise
pass is included in the time. Variants, each its own compile with its own compiler_options:

    nccl                 the engine's step options with --disable-custom-all-reduce: async NCCL all-reduces
    collective_kernels   what the engine compiles its step with (runtime/compiler_options.py), which
                         differs from nccl only in the collective-kernel option
    sync                 nccl + xla_gpu_disable_async_collectives=ALLREDUCE: no async start/done pair
    kernels+sync         both

Each variant's output is compared with nccl's before it is timed: "exact" is bitwise equal; "bf16" equal to within
4 bf16 ulps at the chain's magnitude (|x| < 1), which a different summation order gives; anything more is a
MISMATCH and is not timed. On CPU the GPU options are accepted and ignored: the run checks the script, not speed.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import EngineConfig
from jaxllm.runtime.compiler_options import step_compiler_options
from jaxllm.sharding import TP, make_mesh

CHAIN = 32
TOKENS = (1, 8, 64, 256)
BF16_TOLERANCE = 4 * 2.0**-8  # 4 ulps of bf16 in [0.5, 1)


def variants(tp: int) -> dict[str, dict]:
    # Both from the engine, so that they differ in the collective kernels alone (the step's other GPU options apply
    # to both).
    nccl = step_compiler_options(EngineConfig(tensor_parallel_size=tp, disable_custom_all_reduce=True), "gpu")
    kernels = step_compiler_options(EngineConfig(tensor_parallel_size=tp), "gpu")
    sync = {"xla_gpu_disable_async_collectives": "ALLREDUCE"}
    return {"nccl": nccl, "collective_kernels": kernels, "sync": {**nccl, **sync}, "kernels+sync": {**kernels, **sync}}


def make_chain(mesh, options: dict):
    def chain(x, w):  # x bf16[T, D] and w bf16[1, D]: this device's rows
        for _ in range(CHAIN):
            x = jax.lax.psum(jnp.tanh(x) * w, TP)
        return x

    return jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=(P(TP), P(TP)), out_specs=P()),
                   compiler_options=options or None)


def seconds_per_call(fn, args, *, target_s: float = 0.1, repeats: int = 5) -> float:
    """Median over `repeats` of back-to-back calls, about target_s each. On CPU every call is waited for: simulated
    devices' collectives rendezvous on a thread pool, and a queue of calls can starve one (XLA aborts after 40 s)."""
    wait_each = jax.local_devices()[0].platform == "cpu"
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, min(500, int(target_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
            if wait_each:
                jax.block_until_ready(out)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def compare(out: np.ndarray, reference: np.ndarray | None) -> tuple[str, float | None]:
    if reference is None:
        return "no reference", None
    diff = float(np.max(np.abs(out - reference)))
    if np.array_equal(out, reference):
        return "exact", diff
    return ("bf16" if diff <= BF16_TOLERANCE else "MISMATCH"), diff


def run_case(tp: int, tokens: int, hidden: int) -> list[dict]:
    mesh = make_mesh(tp)
    keys = jax.random.split(jax.random.key(tokens * 131 + tp), 2)
    x = jax.device_put(jax.random.normal(keys[0], (tp * tokens, hidden), jnp.bfloat16), NamedSharding(mesh, P(TP)))
    w = jax.device_put(jax.random.uniform(keys[1], (tp, hidden), jnp.bfloat16, 0.5 / tp, 1.0 / tp),
                       NamedSharding(mesh, P(TP)))
    rows, reference = [], None
    for name, options in variants(tp).items():
        row = {"tp": tp, "tokens": tokens, "hidden": hidden, "bytes": tokens * hidden * 2, "variant": name,
               "compiler_options": options}
        try:
            fn = make_chain(mesh, options).lower(x, w).compile()
            out = np.asarray(fn(x, w).astype(jnp.float32))
        except Exception as e:  # one variant failing must not lose the others
            row["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            print(f"  tp={tp} T={tokens} {name}: {row['error']}", flush=True)
            rows.append(row)
            continue
        if name == "nccl":
            reference = out
        row["check"], row["max_abs_diff"] = compare(out, reference)
        if row["check"] != "MISMATCH":
            row["us_per_all_reduce"] = seconds_per_call(fn, (x, w)) / CHAIN * 1e6
        rows.append(row)
    return rows


def cell(row: dict) -> str:
    if "error" in row:
        return "error"
    if row["check"] == "MISMATCH":
        return "MISMATCH"
    return f"{row['us_per_all_reduce']:.1f}" + ("" if row["check"] in ("exact", "no reference") else "~")


def print_table(rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["variant"] for r in rows))
    cases = list(dict.fromkeys((r["tp"], r["tokens"], r["bytes"]) for r in rows))
    print(f"\nus per all-reduce, bf16 [T, {rows[0]['hidden']}], chain of {CHAIN}; ~ = equal to nccl's output only to "
          f"bf16 rounding")
    print(f"{'tp':>3} {'T':>4} {'KiB':>6} " + " ".join(f"{n:>18}" for n in names))
    for tp, tokens, nbytes in cases:
        cells = {r["variant"]: cell(r) for r in rows if (r["tp"], r["tokens"]) == (tp, tokens)}
        print(f"{tp:>3} {tokens:>4} {nbytes / 1024:>6.0f} " + " ".join(f"{cells.get(n, '-'):>18}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=None,
                        help="tensor-parallel sizes (default: all local devices, and 2 if more)")
    parser.add_argument("--hidden", type=int, choices=(4096, 8192), default=4096, help="8192: a 70B's width")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    count = jax.local_device_count()
    sizes = args.tp or sorted({count, 2} if count > 2 else {count})
    if min(sizes) < 2 or max(sizes) > count:
        parser.error(f"--tp must be in [2, {count}] (the local devices), got {sizes}")
    device = jax.local_devices()[0]
    print(f"{count} x {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    rows = [row for tp in sizes for tokens in args.tokens for row in run_case(tp, tokens, args.hidden)]
    print_table(rows)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": device.device_kind, "platform": device.platform, "devices": count,
                       "jax": jax.__version__, "chain": CHAIN, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
