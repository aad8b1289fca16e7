"""Device memory after each start-up phase, per device: in use, free, and the largest free block.

    python -m benchmarks.memory --model benchmarks/configs/llama-3.1-8b [-tp 4]

Why: Llama-3.1-70B at tensor parallelism 4 spent its start-up with the GPU allocator failing to find a few hundred
MiB. If free memory is split into holes (the separate projections freed between the fused weights and the rest),
the KV cache sized from "limit - in use" does not fit, and the largest free block shows it.
"""

import argparse
import json

import jax

from jaxllm import EngineConfig, sharding
from jaxllm.loading import load_model
from jaxllm.models.state import state_dict
from jaxllm.runtime.runner import ModelRunner

GIB = 2 ** 30


def snapshot(phase: str, devices) -> dict:
    rows = []
    for device in devices:
        stats = device.memory_stats() or {}  # none on CPU
        limit, in_use = stats.get("bytes_limit", 0), stats.get("bytes_in_use", 0)
        largest, peak = stats.get("largest_free_block_bytes", 0), stats.get("peak_bytes_in_use", 0)
        rows.append({"device": device.id, "limit": limit, "in_use": in_use, "free": limit - in_use,
                     "largest_free_block": largest, "peak": peak})
        print(f"{phase:28s} device {device.id}: in use {in_use / GIB:7.2f} GiB, free {(limit - in_use) / GIB:7.2f} "
              f"GiB, largest free block {largest / GIB:7.2f} GiB, peak {peak / GIB:7.2f} GiB", flush=True)
    return {"phase": phase, "devices": rows}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    mesh = sharding.make_mesh(args.tensor_parallel_size)
    devices = list(mesh.devices.flat)
    phases = [snapshot("start", devices)]
    model, _ = load_model(args.model, dtype="bfloat16", load_format="dummy", mesh=mesh)
    jax.block_until_ready(state_dict(model))
    phases.append(snapshot("weights loaded and fused", devices))
    del model
    phases.append(snapshot("weights freed", devices))
    runner = ModelRunner(EngineConfig(model=args.model, load_format="dummy", dtype="bfloat16", enforce_eager=True,
                                      tensor_parallel_size=args.tensor_parallel_size), args.model)
    print(runner.kv_plan.describe(), flush=True)
    phases.append(snapshot("engine: weights + KV cache", devices))
    runner.close()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(phases, f, indent=2)
    return phases


if __name__ == "__main__":
    main()
